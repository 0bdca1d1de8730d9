"""The core training loop: fetch a global batch, step, log, evaluate, checkpoint, decide to exit.

Reads like Megatron-LM's ``train()``: each iteration runs one optimizer step, then the
bookkeeping around it, then saving and the exit decision (:class:`SaveAndExit`, Megatron's
``checkpoint_and_decide_exit``); skipped steps are counted by :class:`SkippedSteps`.
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
from trainrun.checkpoint.policy import CheckpointPolicy
from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import DistEnv
from trainrun.distributed.health import NoHealthMonitor
from trainrun.eval.evaluator import Evaluator
from trainrun.exit_codes import ExitCode
from trainrun.observe import Timers, measure_throughput, memory_stats, progress_bar
from trainrun.observe.profiler import StepProfiler
from trainrun.observe.stragglers import StragglerDetector, forward_is_eager
from trainrun.state import TrainState
from trainrun.train.executors import Batch, StepExecutor, StepResult
from trainrun.train.save_and_exit import SaveAndExit
from trainrun.train.skipped_steps import SkippedSteps

logger = logging.getLogger(__name__)



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
    health: object = field(default_factory=NoHealthMonitor)
    """The rank's health monitor (distributed.health): told of progress at step, eval and save boundaries."""


class TrainingLoop:
    """Runs optimizer steps until ``train.max_steps`` or an exit condition."""

    def __init__(self, cfg: TrainRunConfig, env: DistEnv, components: LoopComponents, flops_per_token: float,
                 peak_flops: float, exit_controller: ExitController | None = None):
        """``exit_controller``: one the caller installed before building (so a signal during set-up is seen
        at the first step boundary); by default the loop makes its own."""
        self.cfg, self.env, self.components, self.state = cfg, env, components, components.state
        self.accum_steps = cfg.accumulation_steps()
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        # On a GPU the step is timed with CUDA events (device time, no sync) and data with the host clock.
        self.timers = Timers(device_timed={"step"} if env.device.type == "cuda" else set())
        self.exit_controller = exit_controller or ExitController(cfg, env, start_step=self.state.step)
        self.exit_controller.start(self.state.step)
        self.skipped = SkippedSteps(self.state, components.executor.scheduler)
        self.save_and_exit = SaveAndExit(cfg, components.checkpointer, components.policy, self.exit_controller,
                                         self.state, self.skipped, on_blocked=self._blocked_by_saving)
        self.stragglers = StragglerDetector(env, cfg.logging.straggler_ratio, components.model_parts,
                                            forward_is_eager(cfg))
        self.last_loss = float("nan")
        self.final_eval: dict[str, float] = {}
        """The last evaluation's per-source losses and the test evaluation of a finished run (the final summary)."""
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._save_blocked_ms = 0.0

    # ---- one step -------------------------------------------------------------------------
    def next_global_batch(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch."""
        with self.timers.time("data"):
            batches = [next(self.components.train_iter) for _ in range(self.accum_steps)]
            if self.env.device.type == "cuda":
                # Pinned pages copy asynchronously: the host moves on to the next batch while the GPU
                # runs this step (no executor waits for the GPU).
                batches = [(x.pin_memory().to(self.env.device, non_blocking=True),
                            y.pin_memory().to(self.env.device, non_blocking=True)) for x, y in batches]
            return batches

    def train_step(self) -> StepResult:
        """Fetch data and run one optimizer step; advance the counters."""
        batches = self.next_global_batch()
        with self.timers.time("step"), self.stragglers.training_step():
            # An async save may still be copying parameters: wait for it before they change.
            result = self.components.executor.step(batches, before_update=self._wait_for_staging)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.state.consumed_tokens += self.tokens_per_step
        self._window_steps += 1
        self.skipped.record(result.skipped, result.finite, result.loss, result.grad_norm)
        return result

    def _wait_for_staging(self) -> None:
        """Executor hook right before the optimizer step; the wait counts as time blocked by saving."""
        if self.components.checkpointer.pending:
            start = time.perf_counter()
            self.components.checkpointer.wait_for_staging()
            self._save_blocked_ms += (time.perf_counter() - start) * 1e3

    def _blocked_by_saving(self, seconds: float) -> None:
        """A save blocked training for ``seconds``: logged, and kept out of tokens/s."""
        self._save_blocked_ms += seconds * 1e3
        self._window_start += seconds

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
        row.update(self.stragglers.check(row.get("time_data", 0.0), self._window_steps, self.state.step))
        if self._save_blocked_ms:
            row["time_ckpt_blocked_ms"] = self._save_blocked_ms
        row.update(memory_stats(self.env.device))
        consumed_by_source = getattr(self.components.train_iter, "consumed_by_source", dict)()
        row.update({f"samples/{name}": count for name, count in consumed_by_source.items()})
        self.components.metrics.log(row, step=self.state.step)
        self.last_loss = float(row["loss"])
        self._window_start, self._window_steps, self._save_blocked_ms = time.perf_counter(), 0, 0.0

    def evaluate(self) -> bool:
        """Run the evaluator, record and log the result; True when the best validation loss improved."""
        start = time.perf_counter()
        result = dict(self.components.evaluator.evaluate())
        elapsed = time.perf_counter() - start
        self._window_start += elapsed  # keep evaluation out of tokens/s
        result["time_eval_ms"] = elapsed * 1e3
        loss = result.get("val_loss")
        self.final_eval = {k: v for k, v in result.items() if k.startswith("val_loss/")}
        improved = False
        if loss is not None:
            self.state.last_val_loss = loss
            improved = self.state.best_val_loss is None or loss < self.state.best_val_loss
            if improved:
                self.state.best_val_loss = loss
        self.components.metrics.log(result, step=self.state.step)
        return improved

    def evaluate_test(self) -> None:
        """Once, after a finished run: the evaluator's test sets (if it has any), logged to every sink."""
        evaluate_test = getattr(self.components.evaluator, "evaluate_test", None)
        if not self.cfg.eval.test or evaluate_test is None:
            return
        start = time.perf_counter()
        result = dict(evaluate_test())
        if not result:
            return
        result["time_test_ms"] = (time.perf_counter() - start) * 1e3
        self.components.metrics.log(result, step=self.state.step)
        self.final_eval.update({k: v for k, v in result.items() if k.startswith("test_loss")})

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> ExitCode:
        """Train to ``train.max_steps``; RESUME when stopped early after saving, BAD_STEPS on persistent NaNs."""
        bar = progress_bar(total=self.cfg.train.max_steps, initial=self.state.step,
                           enabled=self.cfg.train.progress_bar and self.env.is_rank0)
        self.exit_controller.install()
        try:
            with self.components.profiler:
                return self._run_steps(bar)
        finally:
            bar.close()
            # Commit a pending async save while the exit handlers are still installed: a signal
            # now only sets the flag again and cannot interrupt the commit. After a second Ctrl-C
            # the save in flight is abandoned instead (it was never committed, so nothing is lost).
            try:
                if not self.exit_controller.aborted:
                    self.components.checkpointer.close()
            finally:
                self.exit_controller.restore()
                self.stragglers.close()
                self.components.executor.close()  # e.g. a CUDA graph's private memory pool

    def _run_steps(self, bar) -> ExitCode:
        """Step until the end or an exit condition; the exit code says which."""
        max_steps, eval_interval = self.cfg.train.max_steps, self.cfg.eval.interval
        if self.state.step < max_steps and self.exit_controller.check(self.state.step) == "signal":
            # Signalled while the run was being set up: the state is the one resumed, nothing to save.
            # (Time and interval limits wait for a step: a set-up longer than the limit must still progress.)
            reason = "signal"
            logger.info("stopping before step %d (%s arrived during set-up; nothing new to save); exit code %d "
                        "asks to be resumed", self.state.step + 1, reason, ExitCode.RESUME)
            return ExitCode.RESUME
        health = self.components.health
        health.mark_progress(self.state.step)  # training began: the watchdog now also watches progress
        while self.state.step < max_steps:
            result = self.train_step()
            health.mark_progress(self.state.step)
            self.components.profiler.step()
            bar.update(1)
            last = self.state.step == max_steps
            log_now = self.state.step % self.cfg.train.log_interval == 0 or last
            if log_now:
                self.skipped.sync()
            if self.skipped.too_many(self.cfg.train.max_skipped_steps):
                logger.error("%d consecutive steps had a non-finite loss or gradient norm (train.max_skipped_steps="
                             "%d); stopping without saving", self.skipped.longest_run, self.cfg.train.max_skipped_steps)
                self.log_step(result)
                return ExitCode.BAD_STEPS
            if log_now:
                self.log_step(result)
                bar.set_postfix(loss=f"{self.last_loss:.3f}")
            improved = False
            if last or (eval_interval and self.state.step % eval_interval == 0):
                improved = self.evaluate()
                health.mark_progress(self.state.step)  # a long eval is no hang
            reason = self.save_and_exit.after_step(improved)
            health.mark_progress(self.state.step)  # nor is a long save
            if reason is not None:
                logger.info("stopping at step %d (%s); exit code %d asks to be resumed",
                            self.state.step, reason, ExitCode.RESUME)
                return ExitCode.RESUME
        self.evaluate_test()
        health.mark_progress(self.state.step)
        return ExitCode.FINISHED
