"""Apply the configured parallelisms to a GPT: pipeline split → TP/SP → activation checkpointing → FSDP2/HSDP/DDP.

Initialisation: the caller materialises the FULL model from the run seed first (exactly as a
single process does), and the parallelisms then shard those tensors (``distribute_tensor`` of
full tensors, which every rank holds identically). Weights are therefore bit-identical to the
one-process run in every layout, at the cost of holding the full model once per rank at start-up;
fine up to models that fit one device (for larger ones, a meta-device init per shard with a
DTensor-aware RNG would be needed — torchtitan's path, not taken here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.activation_checkpoint import apply_ac
from trainrun.distributed.data_parallel import apply_ddp, apply_fsdp
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.distributed.pipeline import (
    Pipeline,
    build_pipeline,
    split_stage,
    stage_ids,
)
from trainrun.distributed.tensor_parallel import apply_tp

logger = logging.getLogger(__name__)


@dataclass
class ParallelModel:
    """This rank's model parts (one, or its pipeline stages) and the pipeline driving them, if any."""

    parts: list[nn.Module]
    pipeline: Pipeline | None = None


def _parallelize_part(part: nn.Module, cfg: TrainRunConfig, dims: ParallelDims) -> nn.Module:
    p = cfg.parallel
    if dims.tp_enabled:
        apply_tp(part, dims.tp_mesh)
    apply_ac(part, p.activation_checkpointing)
    if dims.fsdp_enabled:
        apply_fsdp(part, dims.fsdp_mesh, cfg.train.precision, p.fsdp_reshard_after_forward)
    elif dims.ddp_enabled:
        apply_ddp(part, dims.ddp_mesh, cfg.train.precision)
    return part


def parallelize(model: nn.Module, cfg: TrainRunConfig, dims: ParallelDims, device: torch.device) -> ParallelModel:
    """Parallelise a materialised full ``model`` for this rank (in place when there is no pipeline)."""
    p = cfg.parallel
    if not dims.pp_enabled:
        return ParallelModel([_parallelize_part(model, cfg, dims)])
    ids = stage_ids(dims.pp_rank, dims.pp, p.pp_stages_per_rank)
    num_stages = dims.pp * p.pp_stages_per_rank
    parts = [_parallelize_part(split_stage(model, sid, num_stages), cfg, dims) for sid in ids]
    del model  # each stage holds its own copy of its blocks
    pipe = build_pipeline(parts, ids, p, dims.pp_rank, dims.pp_group, device)
    logger.info("pipeline: %s, %d stages (this rank: %s), %d micro-batches", p.pp_schedule, num_stages, ids,
                pipe.schedule._n_microbatches)
    return ParallelModel(parts, pipe)
