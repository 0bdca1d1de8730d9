"""AdamW with decoupled weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from trainrun.config.choices import OptimizerImpl
from trainrun.config.schema import OptimConfig
from trainrun.registry import OPTIMIZERS


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into named ``decay`` (ndim >= 2) and ``no_decay`` (ndim < 2) groups.

    Decaying norm gains and biases only pulls them towards 0 (a norm gain of 0 kills its layer)
    and buys no regularisation, so only matmul / embedding matrices decay (nanoGPT, Megatron).
    ``named_parameters`` de-duplicates tied weights, so a tied embedding appears once. Empty groups
    are dropped.
    """
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _implementation_kwargs(implementation: OptimizerImpl, device_type: str) -> dict[str, bool]:
    """Map ``optim.implementation`` to AdamW's ``fused`` / ``foreach`` flags."""
    if implementation is OptimizerImpl.auto:
        # The fused CUDA kernel is one launch for all tensors; elsewhere foreach is the safe fast path.
        implementation = OptimizerImpl.fused if device_type == "cuda" else OptimizerImpl.foreach
    return dict(fused=implementation is OptimizerImpl.fused, foreach=implementation is OptimizerImpl.foreach)


@OPTIMIZERS.register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with named decay / no_decay groups.

    ``device_type`` ("cuda", "cpu", ...) resolves ``cfg.implementation="auto"``: fused on CUDA,
    foreach otherwise; fused, foreach and for_loop are honoured as given.
    """
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **_implementation_kwargs(cfg.implementation, device_type),
    )


def param_group_summary(optimizer: torch.optim.Optimizer) -> str:
    """One log line per optimizer, e.g. ``decay: 26 tensors, 1,234,560 params, wd=0.1 | no_decay: ...``."""
    parts = []
    for i, group in enumerate(optimizer.param_groups):
        n_params = sum(p.numel() for p in group["params"])
        name = group.get("name", f"group{i}")
        parts.append(f"{name}: {len(group['params'])} tensors, {n_params:,} params, wd={group['weight_decay']:g}")
    return " | ".join(parts)
