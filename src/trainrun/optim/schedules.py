"""Learning-rate schedules as multipliers of ``optim.lr``, registered in ``LR_SCHEDULES``.

Each factory ``(cfg, max_steps) -> (step -> multiplier)`` shares the same phases: linear warmup over
``warmup_steps`` from 1/(warmup_steps+1) (so step 0 already trains) to 1, then a decay over
``decay_steps`` (null: ``max_steps - warmup_steps``) to ``min_lr_ratio``, which holds afterwards.
The returned callables are plain closures, so ``LambdaLR.state_dict`` stores no schedule state:
the schedule is rebuilt from the config on resume and only the step counter is restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from trainrun.config.schema import OptimConfig
from trainrun.registry import LR_SCHEDULES

logger = logging.getLogger(__name__)

Schedule = Callable[[int], float]


def _with_warmup(cfg: OptimConfig, max_steps: int, decay: Callable[[float], float]) -> Schedule:
    """Wrap ``decay(progress in [0, 1]) -> multiplier`` with warmup and the post-decay floor."""
    warmup = cfg.warmup_steps
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps - warmup

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = 1.0 if decay_steps <= 0 else min((step - warmup) / decay_steps, 1.0)
        return decay(progress)

    return schedule


@LR_SCHEDULES.register("constant")
def constant_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """Warmup, then 1 forever (``min_lr_ratio`` is ignored)."""
    return _with_warmup(cfg, max_steps, lambda p: 1.0)


@LR_SCHEDULES.register("cosine")
def cosine_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """Warmup, then half a cosine from 1 to ``min_lr_ratio`` (Loshchilov & Hutter 2017)."""
    m = cfg.min_lr_ratio
    return _with_warmup(cfg, max_steps, lambda p: m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p)))


@LR_SCHEDULES.register("linear")
def linear_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """Warmup, then a straight line from 1 to ``min_lr_ratio``."""
    m = cfg.min_lr_ratio
    return _with_warmup(cfg, max_steps, lambda p: 1.0 - (1.0 - m) * p)


def _wsd(cfg: OptimConfig, max_steps: int, shape: Callable[[float], float]) -> Schedule:
    """Warmup-stable-decay: 1 for the first ``1 - wsd_decay_fraction`` of the decay window, then
    ``1 - (1 - min_lr_ratio) * shape(q)`` with q going 0 -> 1 over the last fraction."""
    m, frac = cfg.min_lr_ratio, cfg.wsd_decay_fraction

    def decay(p: float) -> float:
        if frac <= 0.0:
            return 1.0 if p < 1.0 else m
        q = max(0.0, (p - (1.0 - frac)) / frac)  # progress inside the final decay phase
        return 1.0 - (1.0 - m) * shape(min(q, 1.0))

    return _with_warmup(cfg, max_steps, decay)


@LR_SCHEDULES.register("wsd")
def wsd_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM) with a linear final decay: checkpoints from the
    stable phase can be continued, and the short cooldown recovers most of cosine's loss."""
    return _wsd(cfg, max_steps, lambda q: q)


@LR_SCHEDULES.register("wsd_sqrt")
def wsd_sqrt_schedule(cfg: OptimConfig, max_steps: int) -> Schedule:
    """Warmup-stable-decay with the 1-sqrt cooldown, which Hägele et al. 2024 found beats linear."""
    return _wsd(cfg, max_steps, math.sqrt)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying the schedule registered as ``cfg.schedule`` to every param group."""
    if cfg.warmup_steps > max_steps:
        # Legitimate for a short test of a long recipe (e.g. +experiment=gpt_125m train.max_steps=50).
        logger.warning("optim.warmup_steps=%d > train.max_steps=%d: the run ends inside warmup",
                       cfg.warmup_steps, max_steps)
    factory = LR_SCHEDULES.get(cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factory(cfg, max_steps))


class SchedulerGroup:
    """Several LR schedulers (one per model part's optimizer: pipeline stages) stepped and checkpointed as one."""

    def __init__(self, schedulers: list):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        """The schedulers advance in lockstep, so the first one's state stands for all."""
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)

    def get_last_lr(self) -> list[float]:
        return self.schedulers[0].get_last_lr()


def _lambda_schedulers(scheduler) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return list(scheduler.schedulers) if isinstance(scheduler, SchedulerGroup) else [scheduler]


def schedule_state(scheduler) -> dict:
    """The scheduler's state dict with plain floats where it holds tensors (the last LRs of an optimizer
    whose LR lives in a tensor): JSON-safe, and the same whichever way the run held its LR."""
    def host(value):
        if isinstance(value, torch.Tensor):
            return value.item()
        return [host(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {key: host(value) for key, value in scheduler.state_dict().items()}


def scheduled_lr(scheduler) -> float:
    """The learning rate of the first param group at the scheduler's position, as a host float.

    Computed from the schedule, not read from the optimizer: under CUDA-graph capture the LR lives
    in a device tensor, and reading it would wait for the GPU.
    """
    first = _lambda_schedulers(scheduler)[0]
    return float(first.base_lrs[0] * first.lr_lambdas[0](first.last_epoch))


def rewind_schedule(scheduler, steps: int) -> None:
    """Move the schedule back by ``steps`` (skipped steps learned about after the fact) and re-apply its LR.

    Executors that never wait for the GPU step the schedule on every step and learn at log
    intervals which steps were skipped; rewinding keeps the schedule counting applied updates only.
    """
    if steps <= 0:
        return
    for sched in _lambda_schedulers(scheduler):
        sched.last_epoch -= steps
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            lr = base * fn(sched.last_epoch)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
