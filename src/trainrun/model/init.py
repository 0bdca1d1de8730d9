"""Materialise a model built on the ``meta`` device, and the per-parameter init plan that makes it scale.

A model's initial values are defined once, as an ordered list of :class:`ParamInit` (its
``init_plan()``): one entry per parameter, in the order the values are drawn from the torch RNG.
``init_weights`` applies the plan to the model's own tensors; with several processes
(``trainrun.distributed.parallelize``) rank 0 applies it to one full-size parameter at a time and
sends each to its owners, so the weights are the same bit for bit and no process ever holds more
than its shards plus one parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamInit:
    """How one parameter gets its initial value: a draw from N(0, ``std``) or a constant."""

    name: str
    """The parameter's name in ``named_parameters()`` of the unwrapped model (a tied weight: its first name)."""
    shape: tuple[int, ...]
    """Its full (unsharded) shape."""
    dtype: torch.dtype
    """Its dtype."""
    std: float | None = None
    """Standard deviation of the normal draw; None: filled with ``constant``, drawing no random numbers."""
    constant: float = 0.0
    """The value when ``std`` is None (norm weights 1, biases 0)."""

    @property
    def draws_random(self) -> bool:
        """Whether filling it consumes the torch RNG (then only one process may draw it)."""
        return self.std is not None

    @torch.no_grad()
    def fill(self, tensor: torch.Tensor) -> torch.Tensor:
        """Give ``tensor`` (this parameter, full size, or any shard of it when constant) its initial value."""
        if self.std is None:
            return tensor.fill_(self.constant)
        return tensor.normal_(0.0, self.std)


def check_plan_covers(model: nn.Module, plan: list[ParamInit]) -> None:
    """Raise if ``plan`` misses a parameter of ``model`` or names one it lacks: an uncovered parameter would
    keep whatever memory ``to_empty`` left in it."""
    names = {name for name, _ in model.named_parameters()}
    planned = [p.name for p in plan]
    missing, unknown = names - set(planned), set(planned) - names
    if missing or unknown or len(planned) != len(set(planned)):
        raise ValueError(f"{type(model).__name__}.init_plan() does not match its parameters: "
                         f"not initialised {sorted(missing)}, unknown {sorted(unknown)}")


def allocate(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate ``model``'s storage on ``device`` without initialising its parameters (they hold whatever
    the memory held): for a model whose every parameter is about to be loaded. The derived buffers
    (``init_buffers``, e.g. RoPE tables, which no state dict carries) are computed. Returns ``model``."""
    model.to_empty(device=device)
    model.init_buffers()
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate ``model``'s storage on ``device`` and initialise it with ``model.init_weights()``.

    ``to_empty`` allocates uninitialised memory (no wasted init of a model built on ``meta``);
    ``init_weights`` then draws every value from the current torch RNG, so seeding before this call
    makes the weights reproducible. Returns ``model`` (materialised in place) for chaining.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model
