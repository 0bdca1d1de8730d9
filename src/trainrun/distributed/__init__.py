"""Process environments (single, torchrun, Slurm initializers), the DeviceMesh (:mod:`.parallel_dims`) and the
parallelisms applied to a model from outside: DDP / FSDP2 / HSDP, tensor + sequence parallel, pipeline stages and
activation checkpointing."""

from trainrun.distributed.env import DistEnv

__all__ = ["DistEnv"]
