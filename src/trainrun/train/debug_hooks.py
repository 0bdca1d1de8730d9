"""Debugging aids the orchestrator wires from ``debug.*``, outside the executors' and the loop's interfaces.

NaN injection is a forward hook on the model parts; overfitting wraps the data iterator. A run
without ``debug.*`` settings has neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from trainrun.state import TrainState
from trainrun.train.executors import Batch


def install_nan_injection(model_parts: list[nn.Module], state: TrainState, steps: list[int]) -> list[RemovableHandle]:
    """Make every training forward pass of the 1-based ``steps`` return NaN (``debug.inject_nan_at_steps``).

    The hook reads ``state.step`` (the steps finished so far), so it needs no call from the loop;
    evaluation (``module.training`` false) is never poisoned. Every rank poisons the same steps.
    """
    poisoned = frozenset(steps)

    def poison(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if module.training and state.step + 1 in poisoned:
            return output * float("nan")
        return None

    return [part.register_forward_hook(poison) for part in model_parts] if poisoned else []


class RepeatedBatches:
    """The first ``count`` micro-batches of ``source``, over and over (``debug.overfit_batches``).

    Checkpoints keep working: the state is the wrapped iterator's plus the position in the cycle.
    """

    def __init__(self, source: Iterator[Batch], count: int):
        self.source = source
        self.batches = [next(source) for _ in range(count)]
        self.position = 0

    def __iter__(self) -> RepeatedBatches:
        return self

    def __next__(self) -> Batch:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped iterator's state and the cycle position."""
        return {**self.source.state_dict(), "overfit_position": self.position}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the cycle where the checkpoint left it."""
        self.source.load_state_dict(state)  # type: ignore[attr-defined]
        self.position = int(state.get("overfit_position", 0))
