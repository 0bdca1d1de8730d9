"""Data parallelism: FSDP2 (``fully_shard``), HSDP (2-D replicate x shard mesh) or DDP (``replicate``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from trainrun.config.choices import Precision


def mixed_precision_policy(precision: Precision) -> MixedPrecisionPolicy:
    """bf16/fp16 compute params with fp32 gradient reduction; fp32: no casting at all."""
    dtype = Precision(precision).autocast_dtype
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, precision: Precision, reshard_after_forward: bool) -> nn.Module:
    """``fully_shard`` each block, then the root (embeddings, final norm, output) — torchtitan's layout.

    One FSDP unit per block lets the all-gather of block i+1 overlap the compute of block i; the
    root unit keeps tied embeddings together. A 2-D ``mesh`` (dp_replicate, dp_shard) gives HSDP.
    """
    mp = mixed_precision_policy(precision)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's parameters are used last in backward; resharding them after forward only to
    # gather them again at once would be wasted communication.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh, precision: Precision = Precision.fp32) -> nn.Module:
    """DDP as FSDP2-style ``replicate`` per block + root: full parameters on every rank, gradients all-reduced.

    Built on FSDP2's machinery (plain names, no wrapper), so pipeline schedules drive its gradient
    sync like FSDP's; the older DDP-based ``replicate`` mis-averaged gradients under a pipeline schedule.
    """
    from torch.distributed._composable.replicate_with_fsdp import replicate

    mp = mixed_precision_policy(precision)
    for block in model.layers.values():
        replicate(block, mesh=mesh, mp_policy=mp)
    replicate(model, mesh=mesh, mp_policy=mp)
    return model
