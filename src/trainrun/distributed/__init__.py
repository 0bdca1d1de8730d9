"""Process environment initializers (and, later, DeviceMesh parallelism)."""

from trainrun.distributed.env import DistEnv

__all__ = ["DistEnv"]
