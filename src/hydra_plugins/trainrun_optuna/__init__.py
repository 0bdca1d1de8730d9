"""trainrun's Optuna sweeper for Hydra (``hydra/sweeper=trainrun_optuna``), on current optuna.

hydra-optuna-sweeper pins optuna<3, whose RDB storage does not work with SQLAlchemy 2; this plugin
keeps the same search-space grammar on today's optuna. Hydra imports every module of the
``hydra_plugins`` namespace package to find plugins, so importing this one registers the config.
optuna is an extra (``pip install 'trainrun[optuna]'``): no module here imports it at module level, so
the scan works without it, and a search chosen without it is refused with one line before it starts.
"""

from hydra_plugins.trainrun_optuna.config import register

register()
