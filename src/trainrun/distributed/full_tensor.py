"""Copy a full (unsharded) tensor into a parameter or state tensor that may be a shard of it."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores: a DTensor's local shard, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy into ``target`` its piece of ``full`` (the whole logical tensor, present on this rank).

    For a DTensor the piece is cut locally (``distribute_tensor`` with ``src_data_rank=None``: no
    communication), which follows DTensor's own rules for any mix of Shard, StridedShard and Replicate."""
    if isinstance(target, DTensor):
        piece = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(piece.to_local())
    else:
        target.copy_(full)
