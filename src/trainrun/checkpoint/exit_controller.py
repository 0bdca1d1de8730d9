"""Decides, collectively, when training must stop early: signals, exit interval, time limit.

Like Megatron-LM's DistributedSignalHandler: a signal handler only records the signal; at the
next step boundary every rank contributes its flags to one all-reduce (MAX), so all ranks stop
at the same step and save the same checkpoint. A second signal while saving only sets the flag
again; it never interrupts the save, with one exception: a second Ctrl-C (SIGINT) is a person who
wants out now, so it raises KeyboardInterrupt wherever the process is. That is safe at any moment:
a checkpoint is committed by renames that a kill at any point leaves complete or absent (see
``checkpoint.store``), so stopping mid-save loses only the save in progress.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import DistEnv

logger = logging.getLogger(__name__)

REASONS = ("signal", "exit_interval", "exit_duration")


class ExitController:
    """Tracks exit requests and answers 'stop now?' identically on every rank."""

    ctrl_c_seen = False
    """This process received Ctrl-C (SIGINT) during a run: a sweep stops after the point that saw it."""
    sigterm_seen = False
    """This process received SIGTERM during a run: the scheduler's own stop (``scancel``, an operator's
    ``scontrol requeue``, preemption), whose requeue, if any, is the scheduler's to decide."""

    def __init__(self, cfg: TrainRunConfig, env: DistEnv, start_step: int):
        self.env = env
        self.exit_interval = cfg.train.exit_interval
        self.exit_duration_s = None if cfg.train.exit_duration_min is None else cfg.train.exit_duration_min * 60
        self.signals = [signal.Signals[str(name)] for name in cfg.checkpoint.exit_signals]
        self.start_step, self.start_time = start_step, time.monotonic()
        self.received: signal.Signals | None = None
        self.aborted = False
        """A second Ctrl-C asked to stop at once (KeyboardInterrupt was raised)."""
        self._previous: dict[signal.Signals, object] = {}
        self._depth = 0

    def start(self, step: int) -> None:
        """Count ``train.exit_interval`` from ``step`` (the step training resumes at)."""
        self.start_step = step

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        first = self.received is None
        if signum == signal.SIGINT and not first:
            self.aborted = True
            logger.warning("second Ctrl-C: stopping now without saving; checkpoints committed so far are intact "
                           "(rerun the same command to resume from the newest)")
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:
            ExitController.ctrl_c_seen = True
        if signum == signal.SIGTERM:
            ExitController.sigterm_seen = True
        if first and signum == signal.SIGINT:
            logger.warning("Ctrl-C: will save and exit at the next step boundary (Ctrl-C again to stop now, "
                           "without that save)")
        elif first:
            logger.warning("received %s: will save and exit at the next step boundary", self.received.name)

    def install(self) -> ExitController:
        """Install handlers for ``checkpoint.exit_signals`` (main thread only); nested installs are no-ops."""
        self._depth += 1
        if self._depth == 1:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous signal handlers back (when the outermost install ends)."""
        self._depth = max(self._depth - 1, 0)
        if self._depth:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> ExitController:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def local_flags(self, step: int) -> list[float]:
        """This rank's view of each reason (1.0 = stop)."""
        elapsed = time.monotonic() - self.start_time
        return [
            float(self.received is not None),
            float(self.exit_interval is not None and step - self.start_step >= self.exit_interval),
            float(self.exit_duration_s is not None and elapsed >= self.exit_duration_s),
        ]

    def check(self, step: int) -> str | None:
        """The reason to stop now, agreed by all ranks (a MAX all-reduce), or None."""
        return self.agree(step)[0]

    def agree(self, step: int, save_priority: int = 0) -> tuple[str | None, int]:
        """One MAX all-reduce of this rank's exit flags and its wish to save; every rank gets the same answer.

        ``save_priority`` orders the checkpoint kinds a rank's policies ask for (0: none; higher wins).
        Policies may read rank-local state (the time policy reads this rank's clock): deciding on the
        maximum keeps every rank entering the save's collectives together, or none.
        """
        values = self.env.host_all_reduce_max([*self.local_flags(step), float(save_priority)])
        hits = [reason for reason, flag in zip(REASONS, values[:-1], strict=True) if flag > 0]
        return (hits[0] if hits else None), int(values[-1])
