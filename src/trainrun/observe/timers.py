"""Megatron-style named phase timers (data, forward_backward, optimizer, ...)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _cuda_sync() -> None:
    # Kernels are asynchronous: without a sync the timer measures launch time, not run time.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """One named stopwatch accumulating time over any number of start/stop intervals."""

    def __init__(self, name: str, cuda_sync: bool = False):
        self.name = name
        self.cuda_sync = cuda_sync
        self._total_s = 0.0
        self._count = 0
        self._started_at: float | None = None

    @property
    def count(self) -> int:
        """Completed start/stop intervals since the last reset."""
        return self._count

    def start(self) -> Timer:
        """Start an interval; starting a running timer is an error (it would hide a missing stop)."""
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} is already running")
        if self.cuda_sync:
            _cuda_sync()
        self._started_at = time.perf_counter()
        return self

    def stop(self) -> float:
        """Stop the interval and return its length in seconds."""
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        if self.cuda_sync:
            _cuda_sync()
        interval = time.perf_counter() - self._started_at
        self._started_at = None
        self._total_s += interval
        self._count += 1
        return interval

    def elapsed_s(self, reset: bool = True) -> float:
        """Total seconds since the last reset, including a running interval so far."""
        total = self._total_s
        if self._started_at is not None:
            if self.cuda_sync:
                _cuda_sync()
            now = time.perf_counter()
            total += now - self._started_at
            if reset:
                self._started_at = now  # keep running, but count only from now on
        if reset:
            self.reset()
        return total

    def reset(self) -> None:
        """Forget accumulated time and interval count (a running interval keeps running)."""
        self._total_s = 0.0
        self._count = 0


class Timers:
    """A group of named timers: ``timers("data").start()`` / ``with timers.time("optimizer"):``."""

    def __init__(self, cuda_sync: bool = False):
        self.cuda_sync = cuda_sync
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        """Return the timer called ``name``, creating it on first use."""
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = Timer(name, self.cuda_sync)
        return timer

    def __contains__(self, name: object) -> bool:
        return name in self._timers

    def names(self) -> list[str]:
        """Names of the timers created so far, in creation order."""
        return list(self._timers)

    @contextmanager
    def time(self, name: str) -> Iterator[Timer]:
        """Time the body of a ``with`` block under ``name``."""
        timer = self(name).start()
        try:
            yield timer
        finally:
            timer.stop()

    def as_dict(self, prefix: str = "time_", reset: bool = True, steps: int | None = None) -> dict[str, float]:
        """Per-step average milliseconds of every timer since the last reset, keyed ``prefix + name``.

        ``steps`` is the number of optimizer steps in the window; pass it when a phase runs
        several times per step (``data`` per micro-batch) so the value is time per step, not per
        interval. Without it each timer is averaged over its own interval count. Timers that
        recorded nothing are left out.
        """
        out: dict[str, float] = {}
        for name, timer in self._timers.items():
            count = timer.count
            total_ms = timer.elapsed_s(reset=reset) * 1e3
            divisor = steps if steps else count
            if divisor:
                out[prefix + name] = total_ms / divisor
        return out

    def reset(self) -> None:
        """Reset every timer."""
        for timer in self._timers.values():
            timer.reset()
