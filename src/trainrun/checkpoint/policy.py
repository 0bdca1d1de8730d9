"""Checkpoint policies decide when to save; the store decides how."""

from __future__ import annotations

from typing import Protocol

from trainrun.config.schema import CheckpointConfig
from trainrun.registry import CHECKPOINT_POLICIES
from trainrun.train.state import TrainState


class CheckpointPolicy(Protocol):
    """Answers 'save now?' after each step."""

    def should_save(self, state: TrainState, final: bool) -> bool: ...


class IntervalPolicy:
    """Save every ``interval`` steps and at the end of training."""

    def __init__(self, cfg: CheckpointConfig):
        self.interval, self.save_final = cfg.interval, cfg.save_final

    def should_save(self, state: TrainState, final: bool) -> bool:
        """True on interval boundaries, and on the final step when save_final is set."""
        if final:
            return self.save_final
        return self.interval > 0 and state.step % self.interval == 0


@CHECKPOINT_POLICIES.register("interval")
def build_interval_policy(cfg: CheckpointConfig) -> CheckpointPolicy:
    """Every checkpoint.interval steps and on exit."""
    return IntervalPolicy(cfg)
