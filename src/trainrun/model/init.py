"""Materialise a model built on the ``meta`` device."""

from __future__ import annotations

import torch
from torch import nn


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
