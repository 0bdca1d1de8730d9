"""Straggler detection (after Megatron-LM's ``StragglerDetector``): which rank is slow, and on which host.

In synchronous training every rank's *step* takes the same wall time: the fast ranks wait for the slow
one inside the step's collectives, so step times cannot tell who is slow (the waiting rank can even look
slower). Like Megatron, which times the batch load and the model's forward, each rank here measures its
own time per step in the phases without a data-parallel collective: fetching the batch (the loop's
``data`` timer) and the model's forward (hooks on each model part, CUDA events on a GPU). At every log
interval the ranks all-gather that number (host-side, over gloo: ``env.host_group``), and when
slowest/fastest exceeds ``logging.straggler_ratio`` the metrics row gets ``straggler_slowest_rank``,
``straggler_slowest_ms``, ``straggler_fastest_rank``, ``straggler_fastest_ms`` and ``straggler_slowdown``,
and rank 0 logs a warning naming both ranks' hosts.

Forward hooks are used with the executors that call the model's top-level forward eagerly (``eager``, and
``compile`` with ``train.compile.scope=blocks``) without pipeline parallelism; otherwise only the data
time is compared. Under FSDP or tensor parallelism the forward holds all-gathers, so a rank waiting
there for a slow peer is timed too (Megatron's detector has the same limit under TP).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from trainrun.config.choices import CompileScope
from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import DistEnv
from trainrun.observe.timers import CudaEventTimer, Timer

logger = logging.getLogger(__name__)

MIN_GAP_MS = 5.0
"""A slowest rank is named only when it is also this many ms per step slower: below that, timer and
scheduling noise on a busy host (a tiny model's 2 ms against 3 ms) would be reported as stragglers."""


def forward_is_eager(cfg: TrainRunConfig) -> bool:
    """The configured executor calls each model part's top-level forward eagerly, so hooks can time it."""
    if cfg.parallel.pp > 1:
        return False
    executor = cfg.train.step_executor
    return executor == "eager" or (executor == "compile" and cfg.train.compile.scope is CompileScope.blocks)


class StragglerDetector:
    """Times this rank's forward passes during training steps and compares ranks at log intervals."""

    def __init__(self, env: DistEnv, ratio: float, model_parts: list[torch.nn.Module], time_forward: bool):
        """``ratio``: logging.straggler_ratio (0: off); ``time_forward``: the executor runs the parts' forward
        eagerly, so forward hooks measure it."""
        self.env, self.ratio = env, ratio
        self.enabled = ratio > 0 and env.distributed and env.world_size > 1
        self._group = env.host_group
        self._forward: Timer = CudaEventTimer("forward") if env.device.type == "cuda" else Timer("forward")
        self._in_step = False
        self._handles = []
        self.measures = "data+forward" if time_forward else "data"
        """What is compared, for the log line."""
        if not self.enabled:
            return
        if time_forward:
            for part in model_parts:
                self._handles += [part.register_forward_pre_hook(self._forward_starts),
                                  part.register_forward_hook(self._forward_ends)]

    def _forward_starts(self, module, args) -> None:
        if self._in_step:
            self._forward.start()

    def _forward_ends(self, module, args, output) -> None:
        if self._in_step:
            self._forward.stop()

    @contextmanager
    def training_step(self) -> Iterator[None]:
        """Count forward passes inside the ``with`` body only (evaluation runs the same modules)."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def check(self, data_ms: float, steps: int, step: int) -> dict[str, float | int]:
        """At a log interval: gather every rank's mean ms per step of the window (``data_ms`` per step plus
        the timed forward) and return the straggler fields for the metrics row, or {} (a collective: every
        rank calls it)."""
        if not self.enabled or steps <= 0:
            return {}
        own_ms = data_ms + self._forward.elapsed_s(reset=True) * 1e3 / steps
        times = self._all_gather(own_ms)
        slow = max(range(len(times)), key=times.__getitem__)
        fast = min(range(len(times)), key=times.__getitem__)
        slowdown = times[slow] / times[fast] if times[fast] > 0 else float("inf")
        if slowdown <= self.ratio or times[slow] - times[fast] < MIN_GAP_MS:
            return {}
        logger.warning("straggler at step %d: rank %d (host %s) %.1f ms/step of %s, fastest rank %d (host %s) "
                       "%.1f ms (%.2fx > logging.straggler_ratio=%g)", step, slow, self.env.host_of(slow), times[slow],
                       self.measures, fast, self.env.host_of(fast), times[fast], slowdown, self.ratio)
        return {"straggler_slowest_rank": slow, "straggler_slowest_ms": times[slow],
                "straggler_fastest_rank": fast, "straggler_fastest_ms": times[fast],
                "straggler_slowdown": min(slowdown, 1e9)}

    def _all_gather(self, value: float) -> list[float]:
        """Every rank's ``value``, by rank: one small all-gather of CPU floats over gloo."""
        mine = torch.tensor([value], dtype=torch.float64)
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.env.world_size)]
        dist.all_gather(out, mine, group=self._group)
        return [t.item() for t in out]

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
