"""Gradient norm and finiteness over a model however it is sharded (DDP, FSDP2, TP, pipeline stages).

Every rank computes the same global values, so clipping and the decision to skip a step agree
across data-parallel replicas, shards and stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def global_grad_norm(parameters: Sequence[torch.Tensor], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model, however it is sharded (a plain fp32 scalar).

    DTensor gradients (FSDP / TP) are grouped by mesh and placements, each group's norm is made
    whole with ``full_tensor()`` (a sum of squares over the shards), and with pipeline parallelism
    the squared norms of the stages are summed over ``pp_group``. Every rank returns the same value.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else g.device
            groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=_first_device(parameters))
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq += norm.float().to(total_sq.device) ** 2
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def _first_device(parameters: Sequence[torch.Tensor]) -> torch.device:
    for p in parameters:
        return p.device
    return torch.device("cpu")


def clip_grad_norm_global(parameters: Sequence[torch.Tensor], max_norm: float,
                          pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (inf: measure only); return the norm."""
    parameters = list(parameters)
    total = global_grad_norm(parameters, pp_group)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    return total


def finite_flag_on_all_ranks(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Device bool: the loss and the gradient norm are finite on every rank of the job. No host sync.

    The loss is rank-local (each data-parallel rank has its own micro-batches): one rank with an
    inf loss must make every replica skip the step, or the replicas diverge. One MAX all-reduce of
    a one-element flag over the world group.
    """
    bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.detach()))).float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad[0] == 0
