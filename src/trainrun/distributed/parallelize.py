"""Apply the configured parallelisms to a GPT: pipeline split → TP/SP → activation checkpointing → FSDP2/HSDP/DDP.

Initialisation: the model is built and parallelised on the ``meta`` device (torchtitan's order),
each rank allocates only its own shards (``to_empty``), and then the model's ``init_plan`` is
applied one parameter at a time (:func:`init_weights_from_rank0`): rank 0 draws the full
parameter in CPU memory from the run seed's stream, exactly as a single CPU process does, and
sends it to the ranks that own a piece of it (under PP: only the holding stage's ranks), which keep
their shard; constants (norm weights,
biases) are filled in place on every rank and sent nowhere. Weights are identical to the
one-process run in every layout, and no process holds more than its shards plus one full
parameter (Megatron initialises each parameter in full on CPU too, then keeps its slice).

A model without ``init_plan`` is built in full on rank 0 and broadcast
(``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``): the same weights,
but rank 0 then needs the whole model in host memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.activation_checkpoint import apply_ac
from trainrun.distributed.data_parallel import apply_ddp, apply_fsdp
from trainrun.distributed.full_tensor import copy_full_into, local_view
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.distributed.pipeline import (
    Pipeline,
    build_pipeline,
    split_stage,
    stage_ids,
)
from trainrun.distributed.tensor_parallel import apply_tp
from trainrun.model.init import ParamInit, allocate, check_plan_covers

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
    """Fill every rank's (sharded) ``parts`` with the weights of ``build_full()``, run on rank 0 only:
    for a model without ``init_plan`` (rank 0 holds the whole model once)."""
    full_state: dict = {}
    if dist.get_rank() == 0:
        full_state = build_full().state_dict()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for part in parts:  # every rank holds the same number of parts, so the broadcasts pair up
        set_model_state_dict(part, full_state, options=options)


# Wrappers applied while parallelising that put a segment into parameter names (activation checkpointing).
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name in the unwrapped model (what ``init_plan`` and state dicts use)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _owned_parameters(parts: list[nn.Module]) -> dict[str, list[torch.Tensor]]:
    """This rank's parameters by unwrapped name (a tied weight under each of its names: only one is planned)."""
    owned: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        for name, param in part.named_parameters(remove_duplicate=False):
            owned.setdefault(unwrapped_name(name), []).append(param)
    return owned


@dataclass
class _StageRoutes:
    """Under pipeline parallelism, where a parameter goes: only to the ranks of the stage that holds it."""

    stage_ranks: list[list[int]]
    """Global ranks of each pipeline rank's stage(s); the first is the stage's leader (rank 0 for stage 0)."""
    groups: list[dist.ProcessGroup]
    """One process group per pipeline rank, over ``stage_ranks``."""
    stage_of: dict[str, int]
    """Parameter name -> the pipeline rank holding it."""

    @classmethod
    def build(cls, owned: dict[str, list[torch.Tensor]], mesh: DeviceMesh | None) -> _StageRoutes | None:
        """The routes (collective: every rank calls it); None without PP, where every rank owns a piece of
        every parameter."""
        if mesh is None or mesh.size(0) == 1:  # dim 0 is pp (parallel_dims.MESH_DIMS)
            return None
        stage_ranks = [mesh.mesh[k].flatten().tolist() for k in range(mesh.size(0))]
        groups = [dist.new_group(ranks) for ranks in stage_ranks]  # every rank, same order
        names_by_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(names_by_rank, sorted(owned))
        stage_of = {name: k for k, ranks in enumerate(stage_ranks) for rank in ranks for name in names_by_rank[rank]}
        return cls(stage_ranks, groups, stage_of)


def _receive_full(spec: ParamInit, device: torch.device, routes: _StageRoutes | None) -> torch.Tensor | None:
    """The full value of a random parameter on the ranks that hold a piece of it (None elsewhere).

    Rank 0 draws it on the CPU; without PP it is broadcast to every rank. Under PP rank 0 sends it to the
    leader of the stage that holds it, which broadcasts it within that stage only."""
    rank = dist.get_rank()
    stage = routes.stage_of.get(spec.name) if routes is not None else None
    if rank == 0:  # always drawn, even if no stage holds it, so the later parameters get their values
        full = spec.fill(torch.empty(spec.shape, dtype=spec.dtype, device="cpu")).to(device)
    elif routes is None or (stage is not None and rank in routes.stage_ranks[stage]):
        full = torch.empty(spec.shape, dtype=spec.dtype, device=device)
    else:
        return None
    if routes is None:
        dist.broadcast(full, src=0)
        return full
    if stage is None:
        return None
    leader = routes.stage_ranks[stage][0]
    if leader != 0:
        if rank == 0:
            dist.send(full, dst=leader)
            return None
        if rank == leader:
            dist.recv(full, src=0)
    dist.broadcast(full, src=leader, group=routes.groups[stage])
    return full


@torch.no_grad()
def init_weights_from_rank0(parts: list[nn.Module], plan: list[ParamInit], device: torch.device,
                            mesh: DeviceMesh | None = None) -> None:
    """Give every rank's (sharded) ``parts`` the values ``plan`` gives a one-process CPU model.

    Every rank walks the same plan. A constant is filled into each local shard. A random parameter is
    drawn in full by rank 0 on the CPU, from the RNG state a one-process run has at that point, and
    sent (on the process group's device: NCCL wants CUDA) to the ranks that hold a piece of it: every
    rank without PP, the holding stage's ranks under PP (``mesh``: the 4-D mesh, pp first). Each copies
    the piece its parameter holds (``distribute_tensor`` with ``src_data_rank=None`` cuts it locally,
    for any mix of Shard, StridedShard and Replicate) and frees the rest: one parameter at a time.
    """
    start = time.perf_counter()
    owned = _owned_parameters(parts)
    routes = _StageRoutes.build(owned, mesh)
    for spec in plan:
        params = owned.get(spec.name, [])
        if not spec.draws_random:
            for param in params:
                spec.fill(local_view(param))
            continue
        full = _receive_full(spec, device, routes)
        for param in params:
            copy_full_into(param, full)
        del full
    numel = sum(math.prod(spec.shape) for spec in plan)
    logger.info("initialised %s parameters in %d tensors from rank 0, one at a time, in %.1f s",
                f"{numel:,}", len(plan), time.perf_counter() - start)


def init_plan_of(model: nn.Module) -> list[ParamInit] | None:
    """``model.init_plan()``, checked to cover every parameter; None for a model that has none."""
    if not hasattr(model, "init_plan"):
        return None
    plan = model.init_plan()
    check_plan_covers(model, plan)
    return plan


def parallelize(model: nn.Module, cfg: TrainRunConfig, dims: ParallelDims, device: torch.device,
                build_full: Callable[[], nn.Module] | None) -> ParallelModel:
    """Parallelise ``model`` (built on ``meta``) for this rank, allocate its shards on ``device`` and
    initialise them: with the model's ``init_plan`` one parameter at a time, else with the weights
    ``build_full()`` makes on rank 0 (``build_full`` None: the caller loads every parameter itself,
    e.g. from ``model.init_from``, and the shards are left unfilled)."""
    p = cfg.parallel
    plan = init_plan_of(model) if build_full is not None else None
    if not dims.pp_enabled:
        parts = [_parallelize_part(model, cfg, dims)]
    else:
        ids = stage_ids(dims.pp_rank, dims.pp, p.pp_stages_per_rank)
        num_stages = dims.pp * p.pp_stages_per_rank
        parts = [_parallelize_part(split_stage(model, sid, num_stages), cfg, dims) for sid in ids]
    for part in parts:
        allocate(part, device)
    if plan is not None:
        init_weights_from_rank0(parts, plan, device, dims.mesh)
    elif build_full is not None:
        logger.warning("%s has no init_plan(): rank 0 builds the whole model in host memory to initialise it",
                       type(model).__name__)
        load_full_weights_from_rank0(parts, build_full)
    if not dims.pp_enabled:
        return ParallelModel(parts)
    pipe = build_pipeline(parts, ids, p, dims.pp_rank, dims.pp_group, device)
    logger.info("pipeline: %s, %d stages (this rank: %s), %d micro-batches", p.pp_schedule, num_stages, ids,
                pipe.schedule._n_microbatches)
    return ParallelModel(parts, pipe)
