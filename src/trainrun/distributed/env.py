"""The process environment an initializer hands to the rest of trainrun."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Rank, world and device of this process; ``backend`` is None without a process group."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    initializer: str
    layout: str = "pp=1 dp_replicate=1 dp_shard=1 tp=1"
    """The mesh this run builds (parallel degrees), for the start-up log line."""
    host_group: object = None
    """A gloo group for small CPU-tensor agreements when the default group is NCCL; None: the default group."""
    hosts: list[str] = field(default_factory=list)
    """Host name of every rank, indexed by rank (gathered once at start-up), to name a rank's host in messages."""

    @property
    def is_rank0(self) -> bool:
        """True on the process that logs, samples and writes run-level files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised."""
        return self.backend is not None and dist.is_initialized()

    def host_of(self, rank: int) -> str:
        """The host ``rank`` runs on, or ``?`` when unknown."""
        return self.hosts[rank] if 0 <= rank < len(self.hosts) else "?"

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over all ranks (identity in a single process)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every rank (a MIN all-reduce)."""
        if not self.distributed:
            return flag
        return self.host_all_reduce_max([float(not flag)])[0] == 0

    def host_all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of small host values over all ranks, without touching the GPU stream."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float32)
        if self.host_group is None and self.backend != "gloo":
            tensor = tensor.to(self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.host_group)
        return tensor.tolist()

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (identity in a single process). Pickled: use it for small values
        that rank 0 of this job computed, never for data read from files."""
        if not self.distributed:
            return obj
        box = [obj if self.is_rank0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, clean: bool = True) -> None:
        """Destroy the process group this process created.

        ``clean``: every rank reached the end of its work. Then all ranks first meet at a barrier, so
        none tears down its connections while a peer still waits on it, and unreachable objects that
        hold process groups (DTensors, device meshes, DCP's async group) are collected while the
        interpreter is fully alive. After an error no barrier is entered: a peer may never come.
        """
        if not self.distributed:
            return
        if clean:
            dist.barrier()
            gc.collect()
        dist.destroy_process_group()


def nodes_in_job() -> int:
    """How many nodes this job's processes run on, as the launcher says (torchrun, then Slurm); 1 if unknown."""
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["WORLD_SIZE"]) // max(1, int(os.environ["LOCAL_WORLD_SIZE"])))
    return int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))


def node_index(rank: int) -> int:
    """This process's node, as the launcher numbers nodes: torchrun's ``GROUP_RANK`` (its agent's index), else
    Slurm's ``SLURM_NODEID`` (a task started by srun), else ``rank // LOCAL_WORLD_SIZE`` (ranks numbered node by
    node), else 0. Node-local checkpoints group ranks by it; it need not stay the same across restarts."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "")
    return rank // int(local_world) if local_world.isdigit() and int(local_world) > 0 else 0
