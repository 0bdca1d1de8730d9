"""Code the tests share, imported by test modules as ``tests.helpers.<module>``.

conftest.py files hold only fixtures and hooks: ``cli`` runs the CLI as a user would and reads a run's metrics,
``faults`` starts, watches and hurts training processes, ``slurm`` drives the one-node cluster,
``wandb_records`` reads back what wandb wrote offline.
"""
