"""Counting steps skipped for a non-finite loss or gradient norm, without waiting for the device.

Executors that skip on the device (fused AdamW's ``found_inf``) report each step's finite flag as a
tensor; this counter folds the flags into device counters and reads them back (one sync) only at
log intervals and before saves. Executors that decided on the host report a plain bool.
"""

from __future__ import annotations

import logging

import torch

from trainrun.optim.schedules import rewind_schedule

logger = logging.getLogger(__name__)


class SkippedSteps:
    """Consecutive and total skipped steps; the loop stops on ``train.max_skipped_steps`` in a row."""

    def __init__(self, state, scheduler):
        """``state``: the TrainState whose ``skipped_steps`` this counts; ``scheduler``: the LR schedule, rewound
        by the steps that turn out to have been skipped on the device (it was stepped on each of them)."""
        self.state, self.scheduler = state, scheduler
        self.consecutive = 0
        """Skipped steps in a row, up to the last step read."""
        self.longest_run = 0
        """Longest run of consecutive skipped steps since it was last checked against train.max_skipped_steps."""
        self._device: dict[str, torch.Tensor] | None = None
        self._unread = 0

    def record(self, skipped: bool | None, finite: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count one step: ``skipped`` decided on the host, or None (then ``finite`` is read later)."""
        if skipped is None:
            self._count_on_device(finite)
        elif skipped:
            self.state.skipped_steps += 1
            self.consecutive += 1
            self.longest_run = max(self.longest_run, self.consecutive)
            logger.warning("step %d skipped: loss %s, grad norm %s (%d in a row)", self.state.step,
                           loss.item(), grad_norm.item(), self.consecutive)
        else:
            self.consecutive = 0

    def _count_on_device(self, finite: torch.Tensor) -> None:
        """Track skipped steps with device ops only: the executor did not wait for the device."""
        bad = (~finite).to(torch.int64)
        if self._device is None:
            self._device = {k: torch.zeros((), dtype=torch.int64, device=bad.device)
                            for k in ("count", "run", "longest")}
            self._device["run"] += self.consecutive
        d = self._device
        d["count"] += bad
        d["run"] = (d["run"] + 1) * bad
        d["longest"] = torch.maximum(d["longest"], d["run"])
        self._unread += 1

    def sync(self) -> None:
        """Read the device's counters (one sync): at log intervals, before saves and at the end.

        The loop thus learns about skipped steps within one log interval; the schedule, stepped on
        every step by such executors, is rewound by the steps that were skipped.
        """
        if not self._unread or self._device is None:
            return
        d = self._device
        count, run, longest = (int(v) for v in torch.stack([d["count"], d["run"], d["longest"]]).tolist())
        first = self.state.step - self._unread + 1
        d["count"].zero_()
        d["longest"].zero_()
        self._unread = 0
        self.consecutive = run
        self.longest_run = max(self.longest_run, longest)
        if count:
            self.state.skipped_steps += count
            rewind_schedule(self.scheduler, count)
            logger.warning("%d of steps %d-%d skipped: non-finite loss or gradient norm (%d in a row now)",
                           count, first, self.state.step, run)

    def too_many(self, limit: int) -> bool:
        """``limit`` or more skipped in a row since the last check; starts the next check's window."""
        exceeded = self.longest_run >= limit
        if not exceeded:
            self.longest_run = self.consecutive
        return exceeded
