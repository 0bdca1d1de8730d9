"""After each step: save what the checkpoint policies ask for, and decide with every rank whether to stop.

Megatron-LM's ``checkpoint_and_decide_exit``: the policies' wish to save and the exit flags (signal,
exit interval, time limit) are agreed by all ranks in one all-reduce, so all of them save the same
step and stop together. Stopping early always saves first, because the resume code promises it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.exit_controller import ExitController
from trainrun.checkpoint.policy import CheckpointPolicy, SaveContext, SaveKind
from trainrun.checkpoint.store import CheckpointError
from trainrun.config.schema import TrainRunConfig
from trainrun.state import TrainState
from trainrun.train.skipped_steps import SkippedSteps

logger = logging.getLogger(__name__)

SAVE_PRIORITY = {None: 0, SaveKind.NON_PERSISTENT: 1, SaveKind.PERSISTENT: 2}
"""Checkpoint kinds ordered for the ranks' MAX agreement: a persistent wish wins."""
KIND_OF_PRIORITY = {priority: kind for kind, priority in SAVE_PRIORITY.items()}


class SaveAndExit:
    """Saves checkpoints when the policies (or an exit) ask, counts failed saves, answers 'stop now?'."""

    def __init__(self, cfg: TrainRunConfig, checkpointer: Checkpointer, policy: CheckpointPolicy,
                 exit_controller: ExitController, state: TrainState, skipped: SkippedSteps,
                 on_blocked: Callable[[float], None] = lambda seconds: None):
        """``on_blocked(seconds)``: told how long each save blocked training (kept out of tokens/s)."""
        self.cfg, self.checkpointer, self.policy = cfg, checkpointer, policy
        self.exit_controller, self.state, self.skipped = exit_controller, state, skipped
        self.on_blocked = on_blocked
        self.failed_saves = 0
        """Periodic saves that failed since the last one that committed."""
        self._warned_grace = False

    def save(self, kind: SaveKind, blocking: bool | None = None, improved: bool = False,
             exit_save: bool = False) -> Path | None:
        """Checkpoint now; log how long training was blocked. Returns the path once committed (None: async)."""
        start = time.perf_counter()
        path = self.checkpointer.save(kind, blocking=blocking, best=improved and kind == SaveKind.PERSISTENT,
                                      exit_save=exit_save)
        blocked = time.perf_counter() - start
        self.on_blocked(blocked)
        what = str(path) if path else f"step {self.state.step} (async, committing in the background)"
        logger.info("saved %s checkpoint %s; training blocked %.3fs", kind.value, what, blocked)
        if path is not None and kind == SaveKind.PERSISTENT:
            self._warn_if_slower_than_grace(blocked)
        return path

    def _warn_if_slower_than_grace(self, took_s: float) -> None:
        """Once: a blocking save slower than the launcher's grace period would be killed as an exit save."""
        grace = self.cfg.checkpoint.exit_grace_s
        if self._warned_grace or not grace or took_s <= grace:
            return
        self._warned_grace = True
        logger.warning("saving step %d took %.1fs, more than checkpoint.exit_grace_s=%gs: an exit save after a stop "
                       "signal would be killed half way (committed checkpoints survive, the steps since are lost). "
                       "Set checkpoint.exit_verify=size, give the job a longer grace period (torchrun: "
                       "TORCH_ELASTIC_SHUTDOWN_TIMEOUT, Slurm: --signal=...@<seconds> or KillWait), or stop on "
                       "train.exit_duration_min before the time limit", self.state.step, took_s, grace)

    def _save_failed(self, err: CheckpointError, what: str) -> None:
        """Report a failed periodic save; stop once ``checkpoint.max_failed_saves`` failed in a row."""
        self.failed_saves += 1
        limit = self.cfg.checkpoint.max_failed_saves
        if limit and self.failed_saves >= limit:
            raise CheckpointError(
                f"{self.failed_saves} checkpoint saves in a row failed (checkpoint.max_failed_saves={limit}), the "
                f"last one: {err}. Stopping instead of training on without checkpoints; fix the checkpoint "
                "directory (space, permissions, quota) and resume") from err
        logger.error("%s not saved, training continues (previous checkpoints intact; %d failed in a row): %s",
                     what, self.failed_saves, err)

    def _commit_finished_async(self) -> None:
        """Commit an async save whose writes are done on every rank (never waits for one still writing)."""
        start, pending = time.perf_counter(), self.checkpointer.pending
        try:
            committed = self.checkpointer.finalize(blocking=False)
        except CheckpointError as err:
            committed = None
            self._save_failed(err, "async checkpoint")
        if pending:
            self.on_blocked(time.perf_counter() - start)
        if committed:
            self.failed_saves = 0
            logger.info("committed checkpoint %s", committed)

    def _agree(self, improved: bool, final: bool) -> tuple[str | None, SaveKind | None]:
        """The reason to stop and the kind of checkpoint to save now, the same on every rank."""
        minutes = (time.monotonic() - self.checkpointer.last_persistent_save_time) / 60
        wish = self.policy.decide(SaveContext(self.state, final, improved, minutes))
        reason, agreed = self.exit_controller.agree(self.state.step, SAVE_PRIORITY[wish])
        reason = None if final else reason
        kind = KIND_OF_PRIORITY[agreed]
        if kind is not None:
            self.skipped.sync()  # saving waits for the device anyway
        if kind is not None and self.skipped.consecutive:
            # The weights are those of the last good step: wait for a good step before saving.
            logger.warning("not saving at step %d: it is one of %d consecutive skipped steps",
                           self.state.step, self.skipped.consecutive)
            kind = None
        if reason is not None:
            kind = SaveKind.PERSISTENT  # stopping early always saves: the resume code promises it
        return reason, kind

    def after_step(self, improved: bool) -> str | None:
        """Save what the policies ask for; return the agreed reason to stop early, after saving.

        A signal that arrives during a save is seen right after it: that save becomes the exit save
        (at most one exit save, never a second one a step later).
        """
        self._commit_finished_async()
        final = self.state.step >= self.cfg.train.max_steps
        reason, kind = self._agree(improved, final)
        if kind is None:
            return reason
        must_land = final or reason is not None
        try:
            path = self.save(kind, blocking=True if must_land else None, improved=improved,
                             exit_save=reason is not None)
        except CheckpointError as err:
            if must_land:
                raise
            self._save_failed(err, "checkpoint")
            path = None
        if path is not None:  # committed now; an async save resets the count when it commits
            self.failed_saves = 0
        if reason is None and not final:
            reason = self._exit_requested_during_save(kind, path)
        return reason

    def _exit_requested_during_save(self, kind: SaveKind, path: Path | None) -> str | None:
        """After a periodic save: stop now if an exit was requested meanwhile, saving again only if needed."""
        reason = self.exit_controller.check(self.state.step)
        if reason is None:
            return None
        if kind == SaveKind.PERSISTENT and path is None and self.checkpointer.pending:
            try:  # the async save of this very step is the exit save once committed
                path = self.checkpointer.finalize(blocking=True)
            except CheckpointError as err:
                logger.error("async checkpoint of step %d failed: %s", self.state.step, err)
        if kind != SaveKind.PERSISTENT or path is None:
            self.save(SaveKind.PERSISTENT, blocking=True, exit_save=True)
        else:
            logger.info("%s requested during the save of step %d: that checkpoint is the exit save",
                        reason, self.state.step)
        return reason
