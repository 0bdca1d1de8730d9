"""Checkpoints: when to save, where they live, how they commit, what a start resumes from.

* :mod:`~trainrun.checkpoint.policy`: when to save (interval, time, best, final, non-persistent);
* :mod:`~trainrun.checkpoint.paths`: where a run's checkpoints live, and which checkpoint a path names;
* :mod:`~trainrun.checkpoint.layout`: the checkpoint directory's protocol (manifest, verify, commit order,
  ``latest``, recovery, pruning);
* :mod:`~trainrun.checkpoint.dcp_io`: tensors in and out through DCP (async staging, the safe reader);
* :mod:`~trainrun.checkpoint.store`: a save with every rank (DCP writes, rank 0 commits, all agree);
* :mod:`~trainrun.checkpoint.resume`: which checkpoint a start resumes from, and the checks before the build;
* :mod:`~trainrun.checkpoint.checkpointer`: gathers the training state into a checkpoint and restores it;
* :mod:`~trainrun.checkpoint.exit_controller`: when to stop early (signals, limits).

Nothing is imported here: :mod:`trainrun.outputs` reads the path rules without torch.
"""
