"""Parallel degrees, validated once, and the one DeviceMesh built from them (torchtitan's ParallelDims).

Mesh dims, outermost first: ``pp``, ``dp_replicate``, ``dp_shard``, ``tp``. ``tp`` is innermost so
its ranks are adjacent (same node: the most communication-heavy dim gets the fastest links); ``pp``
is outermost (point-to-point only). Global rank = ((pp_r * R + rep_r) * S + shard_r) * T + tp_r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainrun.config.schema import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Degrees of each parallelism and this rank's coordinates; ``build_mesh`` makes the DeviceMesh."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int
    rank: int = 0
    mesh: DeviceMesh | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # The user-facing rule is checked once, by config validation; this guards the arithmetic below.
        if self.dp_replicate * self.dp_shard * self.tp * self.pp != self.world_size:
            raise ValueError(f"{self.describe()} does not describe a world of {self.world_size}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> ParallelDims:
        """Degrees from ``parallel.*`` for this world."""
        return cls(cfg.dp_replicate, cfg.dp_shard, cfg.tp, cfg.pp, world_size, rank)

    def describe(self) -> str:
        """``pp=.. dp_replicate=.. dp_shard=.. tp=..`` for logs and messages."""
        return f"pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp}"

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """Create the one 4-D DeviceMesh (a collective on every rank); None in a single process."""
        if self.world_size > 1 and self.mesh is None:
            self.mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                         mesh_dim_names=MESH_DIMS)
        return self.mesh

    # Which parallelisms are on.
    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: replicas x shards (each reads different data)."""
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        """Pure replication (DDP); with dp_shard>1 the replicas are HSDP's outer dim instead."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    # This rank's coordinates, from the rank arithmetic above (no mesh needed).
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        """Data-parallel rank: TP and PP peers of one data-parallel rank read identical data."""
        return (self.rank // self.tp) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp_size)

    # Sub-meshes and groups.
    def _require_mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must run before sub-meshes are used")
        return self.mesh

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._require_mesh()["tp"]

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self._require_mesh()["pp"].get_group()

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """FSDP2's mesh: 2-D (replicate, shard) for HSDP, else the shard dim."""
        mesh = self._require_mesh()
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]

    @property
    def ddp_mesh(self) -> DeviceMesh:
        return self._require_mesh()["dp_replicate"]
