"""Checkpoint policies decide when to save (and what kind); the store decides how.

The built-in policies are always asked and each is switched by its own field (``interval``,
``time_interval_min``, ``save_best``, ``save_final``, ``non_persistent_interval``);
``checkpoint.policies`` adds registered ones. After each step every policy is asked, and
a persistent request wins over a non-persistent one. Saving on exit (signal, time limit,
exit interval) is not a policy: the loop always does it, because the resume code promises it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from trainrun.config.schema import CheckpointConfig
from trainrun.registry import CHECKPOINT_POLICIES
from trainrun.state import TrainState


class SaveKind(str, Enum):
    """Where a checkpoint goes."""

    PERSISTENT = "persistent"
    """checkpoints/step_<N>, kept by keep_last."""
    NON_PERSISTENT = "non_persistent"
    """Fast local copy; only the newest is kept."""


@dataclass(frozen=True)
class SaveContext:
    """What a policy may look at after a step."""

    state: TrainState
    final: bool
    """The step just completed is the last one (train.max_steps)."""
    improved: bool
    """An evaluation ran at this step and improved the best validation loss."""
    minutes_since_save: float
    """Wall-clock minutes since the last persistent save (or since start)."""


class CheckpointPolicy(Protocol):
    """Answers 'save now, and what kind?' after each step."""

    def decide(self, ctx: SaveContext) -> SaveKind | None: ...


class StepIntervalPolicy:
    """Every ``interval`` steps (0 disables it), saving checkpoints of one kind."""

    def __init__(self, interval: int, kind: SaveKind):
        self.interval, self.kind = interval, kind

    def decide(self, ctx: SaveContext) -> SaveKind | None:
        """``kind`` on multiples of the interval."""
        hit = self.interval > 0 and ctx.state.step % self.interval == 0
        return self.kind if hit else None


def interval_policy(cfg: CheckpointConfig) -> StepIntervalPolicy:
    """Every ``checkpoint.interval`` steps, persistent."""
    return StepIntervalPolicy(cfg.interval, SaveKind.PERSISTENT)


def non_persistent_policy(cfg: CheckpointConfig) -> StepIntervalPolicy:
    """Every ``checkpoint.non_persistent_interval`` steps, to the fast local directory (newest only)."""
    return StepIntervalPolicy(cfg.non_persistent_interval, SaveKind.NON_PERSISTENT)


class TimePolicy:
    """Every ``checkpoint.time_interval_min`` minutes of wall time."""

    def __init__(self, cfg: CheckpointConfig):
        self.minutes = cfg.time_interval_min

    def decide(self, ctx: SaveContext) -> SaveKind | None:
        """Persistent once the time since the last save exceeds the limit."""
        due = self.minutes is not None and ctx.minutes_since_save >= self.minutes
        return SaveKind.PERSISTENT if due else None


class BestPolicy:
    """Whenever the validation loss improves (``checkpoint.save_best``)."""

    def __init__(self, cfg: CheckpointConfig):
        self.enabled = cfg.save_best

    def decide(self, ctx: SaveContext) -> SaveKind | None:
        """Persistent on an improved evaluation."""
        return SaveKind.PERSISTENT if self.enabled and ctx.improved else None


class FinalPolicy:
    """When training reaches ``train.max_steps`` (``checkpoint.save_final``)."""

    def __init__(self, cfg: CheckpointConfig):
        self.enabled = cfg.save_final

    def decide(self, ctx: SaveContext) -> SaveKind | None:
        """Persistent on the last step."""
        return SaveKind.PERSISTENT if self.enabled and ctx.final else None


class CombinedPolicy:
    """Asks every policy; persistent beats non-persistent."""

    def __init__(self, policies: list[CheckpointPolicy]):
        self.policies = policies

    def decide(self, ctx: SaveContext) -> SaveKind | None:
        """The strongest request of any policy, or None."""
        kinds = {policy.decide(ctx) for policy in self.policies}
        for kind in (SaveKind.PERSISTENT, SaveKind.NON_PERSISTENT):
            if kind in kinds:
                return kind
        return None


BUILT_IN_POLICIES = {
    "interval": (interval_policy, "checkpoint.interval"),
    "time": (TimePolicy, "checkpoint.time_interval_min"),
    "best": (BestPolicy, "checkpoint.save_best"),
    "final": (FinalPolicy, "checkpoint.save_final"),
    "non_persistent": (non_persistent_policy, "checkpoint.non_persistent_interval"),
}
"""Name -> (factory, the field that switches it)."""

for _name, (_factory, _switch) in BUILT_IN_POLICIES.items():
    CHECKPOINT_POLICIES.register(_name, _factory, switch=_switch)


def build_policy(cfg: CheckpointConfig) -> CheckpointPolicy:
    """Every built-in policy (inert where its field turns it off) plus the extras of ``checkpoint.policies``."""
    built_in = [factory(cfg) for factory, _ in BUILT_IN_POLICIES.values()]
    return CombinedPolicy(built_in + [CHECKPOINT_POLICIES.get_extra(name)(cfg) for name in cfg.policies])
