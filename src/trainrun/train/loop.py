"""The core training loop: fetch a global batch, step, log, evaluate, checkpoint, decide to exit.

Reads like Megatron-LM's ``train()``: each iteration runs one optimizer step, then the
bookkeeping around it, then ``checkpoint_and_decide_exit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.exit_controller import ExitController
from trainrun.checkpoint.policy import CheckpointPolicy, SaveContext, SaveKind
from trainrun.checkpoint.store import CheckpointError
from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import DistEnv
from trainrun.eval.evaluator import Evaluator
from trainrun.exit_codes import ExitCode
from trainrun.observe import Timers, measure_throughput, memory_stats, progress_bar
from trainrun.observe.profiler import StepProfiler
from trainrun.optim.schedules import rewind_schedule
from trainrun.state import TrainState
from trainrun.train.executors import Batch, StepExecutor, StepResult

logger = logging.getLogger(__name__)

SAVE_RANK = {None: 0, SaveKind.NON_PERSISTENT: 1, SaveKind.PERSISTENT: 2}
"""Checkpoint kinds ordered for the ranks' MAX agreement: a persistent wish wins."""
KIND_OF_RANK = {rank: kind for kind, rank in SAVE_RANK.items()}


@dataclass
class LoopComponents:
    """Everything the loop drives; built by the orchestrator."""

    model_parts: list[torch.nn.Module]
    executor: StepExecutor
    train_iter: Iterator[Batch]
    evaluator: Evaluator
    checkpointer: Checkpointer
    policy: CheckpointPolicy
    metrics: object  # observe.MetricLogger
    state: TrainState
    profiler: StepProfiler = field(default_factory=lambda: StepProfiler(Path("."), active_steps=0))
    """Traces a window of steps when ``debug.profile_steps`` > 0; a no-op otherwise."""


class TrainingLoop:
    """Runs optimizer steps until ``train.max_steps`` or an exit condition."""

    def __init__(self, cfg: TrainRunConfig, env: DistEnv, parts: LoopComponents, flops_per_token: float,
                 peak_flops: float, exit_controller: ExitController | None = None):
        """``exit_controller``: one the caller installed before building (so a signal during set-up is seen
        at the first step boundary); by default the loop makes its own."""
        self.cfg, self.env, self.parts, self.state = cfg, env, parts, parts.state
        self.accum_steps = cfg.accumulation_steps()
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # On a GPU the step is timed with CUDA events (device time, no sync) and data with the host clock.
        self.timers = Timers(device_timed={"step"} if env.device.type == "cuda" else set())
        self.exit_controller = exit_controller or ExitController(cfg, env, start_step=self.state.step)
        self.exit_controller.start(self.state.step)
        self.consecutive_skips = 0
        self.longest_skip_run = 0
        """Longest run of consecutive skipped steps since it was last checked against train.max_skipped_steps."""
        self._device_skips: dict[str, torch.Tensor] | None = None
        self._unread_steps = 0
        self.failed_saves = 0
        """Periodic saves that failed since the last one that committed."""
        self._warned_grace = False
        self.last_loss = float("nan")
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._save_blocked_ms = 0.0

    # ---- one step -------------------------------------------------------------------------
    def next_global_batch(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch."""
        with self.timers.time("data"):
            batches = [next(self.parts.train_iter) for _ in range(self.accum_steps)]
            if self.env.device.type == "cuda":
                # Pinned pages copy asynchronously: the host moves on to the next batch while the GPU
                # runs this step (no executor waits for the GPU).
                batches = [(x.pin_memory().to(self.env.device, non_blocking=True),
                            y.pin_memory().to(self.env.device, non_blocking=True)) for x, y in batches]
            return batches

    def train_step(self) -> StepResult:
        """Fetch data and run one optimizer step; advance the counters."""
        batches = self.next_global_batch()
        with self.timers.time("step"):
            # An async save may still be copying parameters: wait for it before they change.
            result = self.parts.executor.step(batches, before_update=self._wait_for_staging)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.state.consumed_tokens += self.tokens_per_step
        self._window_steps += 1
        if result.skipped is None:
            self._count_on_device(result.finite)
        elif result.skipped:
            self.state.skipped_steps += 1
            self.consecutive_skips += 1
            self.longest_skip_run = max(self.longest_skip_run, self.consecutive_skips)
            logger.warning("step %d skipped: loss %s, grad norm %s (%d in a row)", self.state.step,
                           result.loss.item(), result.grad_norm.item(), self.consecutive_skips)
        else:
            self.consecutive_skips = 0
        return result

    def _count_on_device(self, finite: torch.Tensor) -> None:
        """Track skipped steps with device ops only: the executor did not wait for the device."""
        bad = (~finite).to(torch.int64)
        if self._device_skips is None:
            self._device_skips = {k: torch.zeros((), dtype=torch.int64, device=bad.device)
                                  for k in ("count", "run", "longest")}
            self._device_skips["run"] += self.consecutive_skips
        d = self._device_skips
        d["count"] += bad
        d["run"] = (d["run"] + 1) * bad
        d["longest"] = torch.maximum(d["longest"], d["run"])
        self._unread_steps += 1

    def sync_skips(self) -> None:
        """Read the device's skip counters (one sync): at log intervals, before saves and at the end.

        The loop thus learns about skipped steps within one log interval; the schedule, stepped on
        every step by such executors, is rewound by the steps that were skipped.
        """
        if not self._unread_steps or self._device_skips is None:
            return
        d = self._device_skips
        count, run, longest = (int(v) for v in torch.stack([d["count"], d["run"], d["longest"]]).tolist())
        first = self.state.step - self._unread_steps + 1
        d["count"].zero_()
        d["longest"].zero_()
        self._unread_steps = 0
        self.consecutive_skips = run
        self.longest_skip_run = max(self.longest_skip_run, longest)
        if count:
            self.state.skipped_steps += count
            rewind_schedule(self.parts.executor.scheduler, count)
            logger.warning("%d of steps %d-%d skipped: non-finite loss or gradient norm (%d in a row now)",
                           count, first, self.state.step, run)

    def _wait_for_staging(self) -> None:
        """Executor hook right before the optimizer step; the wait counts as time blocked by saving."""
        if self.parts.checkpointer.pending:
            start = time.perf_counter()
            self.parts.checkpointer.wait_for_staging()
            self._save_blocked_ms += (time.perf_counter() - start) * 1e3

    # ---- bookkeeping ----------------------------------------------------------------------
    def log_step(self, result: StepResult) -> None:
        """Reduce the loss over ranks and emit one metrics row (syncs the device)."""
        elapsed = time.perf_counter() - self._window_start
        self.state.train_time_s += elapsed
        speed = measure_throughput(self.tokens_per_step * self._window_steps, elapsed, self.flops_per_token,
                                   self.env.world_size, self.peak_flops)
        row: dict[str, float | int] = {
            "loss": self.env.all_reduce_mean(result.loss).item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens_per_s": speed.tokens_per_s,
            "tflops_per_device": speed.tflops_per_device,
            "mfu": speed.mfu,
            "consumed_tokens": self.state.consumed_tokens,
            "skipped_steps": self.state.skipped_steps,
        }
        row.update(self.timers.as_dict(prefix="time_", reset=True, steps=self._window_steps))
        if self._save_blocked_ms:
            row["time_ckpt_blocked_ms"] = self._save_blocked_ms
        row.update(memory_stats(self.env.device))
        self.parts.metrics.log(row, step=self.state.step)
        self.last_loss = float(row["loss"])
        self._window_start, self._window_steps, self._save_blocked_ms = time.perf_counter(), 0, 0.0

    def evaluate(self) -> bool:
        """Run the evaluator, record and log the result; True when the best validation loss improved."""
        start = time.perf_counter()
        result = dict(self.parts.evaluator.evaluate())
        elapsed = time.perf_counter() - start
        self._window_start += elapsed  # keep evaluation out of tokens/s
        result["time_eval_ms"] = elapsed * 1e3
        loss = result.get("val_loss")
        improved = False
        if loss is not None:
            self.state.last_val_loss = loss
            improved = self.state.best_val_loss is None or loss < self.state.best_val_loss
            if improved:
                self.state.best_val_loss = loss
        self.parts.metrics.log(result, step=self.state.step)
        return improved

    def save(self, kind: SaveKind, blocking: bool | None = None, improved: bool = False,
             exit_save: bool = False) -> Path | None:
        """Checkpoint now; log how long training was blocked. Returns the path once committed (None: async)."""
        start = time.perf_counter()
        path = self.parts.checkpointer.save(kind, blocking=blocking, best=improved and kind == SaveKind.PERSISTENT,
                                            exit_save=exit_save)
        blocked = time.perf_counter() - start
        self._save_blocked_ms += blocked * 1e3
        self._window_start += blocked  # keep saves out of tokens/s
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

    def checkpoint_and_decide_exit(self, improved: bool) -> str | None:
        """Save what the policies ask for; return the agreed reason to stop early, after saving.

        The policies' wish to save and the exit flags are agreed by all ranks in one all-reduce. A
        signal that arrives during a save is seen right after it: that save becomes the exit save
        (at most one exit save, never a second one a step later).
        """
        start, pending = time.perf_counter(), self.parts.checkpointer.pending
        try:
            committed = self.parts.checkpointer.finalize(blocking=False)
        except CheckpointError as err:
            committed = None
            self._save_failed(err, "async checkpoint")
        if pending:
            self._save_blocked_ms += (time.perf_counter() - start) * 1e3
        if committed:
            self.failed_saves = 0
            logger.info("committed checkpoint %s", committed)
        final = self.state.step >= self.cfg.train.max_steps
        minutes = (time.monotonic() - self.parts.checkpointer.last_persistent_save_time) / 60
        wish = self.parts.policy.decide(SaveContext(self.state, final, improved, minutes))
        reason, agreed = self.exit_controller.agree(self.state.step, SAVE_RANK[wish])
        if final:
            reason = None
        kind = KIND_OF_RANK[agreed]
        if kind is not None:
            self.sync_skips()  # saving waits for the device anyway
        if kind is not None and self.consecutive_skips:
            # The weights are those of the last good step: wait for a good step before saving.
            logger.warning("not saving at step %d: it is one of %d consecutive skipped steps",
                           self.state.step, self.consecutive_skips)
            kind = None
        if reason is not None:
            kind = SaveKind.PERSISTENT  # stopping early always saves: the resume code promises it
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
        if kind == SaveKind.PERSISTENT and path is None and self.parts.checkpointer.pending:
            try:  # the async save of this very step is the exit save once committed
                path = self.parts.checkpointer.finalize(blocking=True)
            except CheckpointError as err:
                logger.error("async checkpoint of step %d failed: %s", self.state.step, err)
        if kind != SaveKind.PERSISTENT or path is None:
            self.save(SaveKind.PERSISTENT, blocking=True, exit_save=True)
        else:
            logger.info("%s requested during the save of step %d: that checkpoint is the exit save",
                        reason, self.state.step)
        return reason

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Train to ``train.max_steps``; RESUME when stopped early after saving, BAD_STEPS on persistent NaNs."""
        bar = progress_bar(total=self.cfg.train.max_steps, initial=self.state.step,
                           enabled=self.cfg.train.progress_bar and self.env.is_rank0)
        self.exit_controller.install()
        try:
            with self.parts.profiler:
                return self._run_steps(bar)
        finally:
            bar.close()
            # Commit a pending async save while the exit handlers are still installed: a signal
            # now only sets the flag again and cannot interrupt the commit. After a second Ctrl-C
            # the save in flight is abandoned instead (it was never committed, so nothing is lost).
            try:
                if not self.exit_controller.aborted:
                    self.parts.checkpointer.close()
            finally:
                self.exit_controller.restore()
                close = getattr(self.parts.executor, "close", None)
                if close is not None:
                    close()  # e.g. a CUDA graph's private memory pool

    def _run_steps(self, bar) -> ExitCode:
        """Step until the end or an exit condition; the exit code says which."""
        max_steps, eval_interval = self.cfg.train.max_steps, self.cfg.eval.interval
        if self.state.step < max_steps and (reason := self.exit_controller.check(self.state.step)):
            # Asked to stop while the run was being set up: the state is the one resumed, nothing to save.
            logger.info("stopping before step %d (%s arrived during set-up; nothing new to save); exit code %d "
                        "asks to be resumed", self.state.step + 1, reason, ExitCode.RESUME)
            return ExitCode.RESUME
        while self.state.step < max_steps:
            result = self.train_step()
            self.parts.profiler.step()
            bar.update(1)
            last = self.state.step == max_steps
            log_now = self.state.step % self.cfg.train.log_interval == 0 or last
            if log_now:
                self.sync_skips()
            if self.longest_skip_run >= self.cfg.train.max_skipped_steps:
                logger.error("%d consecutive steps had a non-finite loss or gradient norm (train.max_skipped_steps="
                             "%d); stopping without saving", self.longest_skip_run, self.cfg.train.max_skipped_steps)
                self.log_step(result)
                return ExitCode.BAD_STEPS
            self.longest_skip_run = self.consecutive_skips
            if log_now:
                self.log_step(result)
                bar.set_postfix(loss=f"{self.last_loss:.3f}")
            improved = False
            if last or (eval_interval and self.state.step % eval_interval == 0):
                improved = self.evaluate()
            reason = self.checkpoint_and_decide_exit(improved)
            if reason is not None:
                logger.info("stopping at step %d (%s); exit code %d asks to be resumed",
                            self.state.step, reason, ExitCode.RESUME)
                return ExitCode.RESUME
        return ExitCode.FINISHED
