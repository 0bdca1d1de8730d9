"""Megatron-style named phase timers (data, forward_backward, optimizer, ...)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Timer:
    """One named stopwatch of host wall time, accumulating over any number of start/stop intervals.

    GPU work is timed by :class:`CudaEventTimer` instead: host time around asynchronous kernels
    would measure their launch, not their run.
    """

    def __init__(self, name: str):
        self.name = name
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
        self._started_at = time.perf_counter()
        return self

    def stop(self) -> float:
        """Stop the interval and return its length in seconds."""
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        interval = time.perf_counter() - self._started_at
        self._started_at = None
        self._total_s += interval
        self._count += 1
        return interval

    def elapsed_s(self, reset: bool = True) -> float:
        """Total seconds since the last reset, including a running interval so far."""
        total = self._total_s
        if self._started_at is not None:
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


class CudaEventTimer(Timer):
    """Device time between CUDA events recorded on the current stream: no host sync when starting or
    stopping; the events are read (waiting for the last one) only when the total is asked for, which
    the loop does at log intervals."""

    def __init__(self, name: str):
        super().__init__(name)
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start_event: torch.cuda.Event | None = None

    def start(self) -> Timer:
        """Record a start event."""
        if self._start_event is not None:
            raise RuntimeError(f"timer {self.name!r} is already running")
        self._start_event = torch.cuda.Event(enable_timing=True)
        self._start_event.record()
        return self

    def stop(self) -> float:
        """Record an end event; the interval's length is known later (returns 0.0 now)."""
        if self._start_event is None:
            raise RuntimeError(f"timer {self.name!r} was stopped without being started")
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start_event, end))
        self._start_event = None
        self._count += 1
        return 0.0

    def elapsed_s(self, reset: bool = True) -> float:
        """Total device seconds of the completed intervals since the last reset (waits for the last event)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._total_s += sum(start.elapsed_time(end) for start, end in self._pending) / 1e3
            self._pending.clear()
        total = self._total_s
        if reset:
            self.reset()
        return total


class Timers:
    """A group of named timers: ``timers("data").start()`` / ``with timers.time("optimizer"):``.

    Names in ``device_timed`` use :class:`CudaEventTimer` (phases that run on the GPU); the others
    measure host wall time.
    """

    def __init__(self, device_timed: frozenset[str] | set[str] = frozenset()):
        self.device_timed = frozenset(device_timed)
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer:
        """Return the timer called ``name``, creating it on first use."""
        timer = self._timers.get(name)
        if timer is None:
            timer = CudaEventTimer(name) if name in self.device_timed else Timer(name)
            self._timers[name] = timer
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
