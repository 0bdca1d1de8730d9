"""Materialise a model built on the ``meta`` device."""

from __future__ import annotations

import torch
from torch import nn


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
