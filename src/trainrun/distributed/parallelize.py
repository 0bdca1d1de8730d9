"""Apply the configured parallelisms to a GPT: pipeline split → TP/SP → activation checkpointing → FSDP2/HSDP/DDP.

Initialisation, torchtitan's order: the model is built and parallelised on the ``meta`` device,
each rank allocates only its own shards (``to_empty``), and then rank 0 initialises the FULL model
from the run seed in CPU memory, exactly as a single CPU process does, and broadcasts it into
every rank's shards (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``).
Weights are therefore identical to the one-process run in every layout, no accelerator ever
holds more than its shards, and only rank 0 needs the full model, in host memory, once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

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
from trainrun.model.init import allocate

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


def load_full_weights_from_rank0(parts: list[nn.Module], build_full: Callable[[], nn.Module]) -> None:
    """Fill every rank's (sharded) ``parts`` with the weights of ``build_full()``, run on rank 0 only."""
    full_state: dict = {}
    if dist.get_rank() == 0:
        full_state = build_full().state_dict()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for part in parts:  # every rank holds the same number of parts, so the broadcasts pair up
        set_model_state_dict(part, full_state, options=options)


def parallelize(model: nn.Module, cfg: TrainRunConfig, dims: ParallelDims, device: torch.device,
                build_full: Callable[[], nn.Module] | None) -> ParallelModel:
    """Parallelise ``model`` (built on ``meta``) for this rank, allocate its shards on ``device`` and
    load them with the weights ``build_full()`` makes on rank 0 (None: the caller loads every parameter
    itself, e.g. from ``model.init_from``, and the shards are left unfilled)."""
    p = cfg.parallel
    if not dims.pp_enabled:
        parts = [_parallelize_part(model, cfg, dims)]
    else:
        ids = stage_ids(dims.pp_rank, dims.pp, p.pp_stages_per_rank)
        num_stages = dims.pp * p.pp_stages_per_rank
        parts = [_parallelize_part(split_stage(model, sid, num_stages), cfg, dims) for sid in ids]
    for part in parts:
        allocate(part, device)
    if build_full is not None:
        load_full_weights_from_rank0(parts, build_full)
    if not dims.pp_enabled:
        return ParallelModel(parts)
    pipe = build_pipeline(parts, ids, p, dims.pp_rank, dims.pp_group, device)
    logger.info("pipeline: %s, %d stages (this rank: %s), %d micro-batches", p.pp_schedule, num_stages, ids,
                pipe.schedule._n_microbatches)
    return ParallelModel(parts, pipe)
