"""The core training loop: fetch a global batch, step, log, evaluate, checkpoint, decide to exit."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.policy import CheckpointPolicy
from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import DistEnv
from trainrun.eval.evaluator import Evaluator
from trainrun.exit_codes import ExitCode
from trainrun.observe import Timers, memory_stats, progress_bar
from trainrun.train.executors import Batch, StepExecutor, StepResult
from trainrun.train.state import TrainState

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


class TrainingLoop:
    """Runs optimizer steps until ``train.max_steps`` or an exit condition, like Megatron's ``train()``."""

    def __init__(self, cfg: TrainRunConfig, env: DistEnv, parts: LoopComponents, flops_per_token: float,
                 peak_flops: float):
        self.cfg, self.env, self.parts, self.state = cfg, env, parts, parts.state
        dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
        self.accum_steps = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.timers = Timers(cuda_sync=env.device.type == "cuda")
        self.start_step = self.state.step
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self.last_loss = float("nan")

    def next_global_batch(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch."""
        with self.timers.time("data"):
            return [next(self.parts.train_iter) for _ in range(self.accum_steps)]

    def train_step(self) -> StepResult:
        """Fetch data and run one optimizer step; advance the counters."""
        batches = self.next_global_batch()
        with self.timers.time("step"):
            result = self.parts.executor.step(batches)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.state.consumed_tokens += self.tokens_per_step
        self._window_steps += 1
        return result

    def log_step(self, result: StepResult) -> None:
        """Reduce the loss over ranks and emit one metrics row (syncs the device)."""
        elapsed = time.perf_counter() - self._window_start
        self.state.train_time_s += elapsed
        tokens_per_s = self.tokens_per_step * self._window_steps / max(elapsed, 1e-9)
        per_device_flops = tokens_per_s * self.flops_per_token / self.env.world_size
        row: dict[str, float | int] = {
            "loss": self.env.all_reduce_mean(result.loss).item(),
            "lr": result.lr,
            "grad_norm": result.grad_norm.item(),
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": per_device_flops / 1e12,
            "mfu": per_device_flops / self.peak_flops,
            "consumed_tokens": self.state.consumed_tokens,
        }
        row.update(self.timers.as_dict(prefix="time_", reset=True, steps=self._window_steps))
        row.update(memory_stats(self.env.device))
        self.parts.metrics.log(row, step=self.state.step)
        self.last_loss = float(row["loss"])
        self._window_start, self._window_steps = time.perf_counter(), 0

    def evaluate(self) -> dict[str, float]:
        """Run the evaluator, record the result and log it."""
        start = time.perf_counter()
        result = dict(self.parts.evaluator.evaluate())
        elapsed = time.perf_counter() - start
        self._window_start += elapsed  # keep evaluation out of tokens/s
        result["time_eval_ms"] = elapsed * 1e3
        loss = result.get("val_loss")
        if loss is not None:
            self.state.last_val_loss = loss
            if self.state.best_val_loss is None or loss < self.state.best_val_loss:
                self.state.best_val_loss = loss
        self.parts.metrics.log(result, step=self.state.step)
        return result

    def save(self) -> None:
        """Checkpoint now, with the time it blocked training logged."""
        start = time.perf_counter()
        path = self.parts.checkpointer.save()
        logger.info("saved checkpoint %s in %.2fs", path, time.perf_counter() - start)
        self._window_start += time.perf_counter() - start  # keep saves out of tokens/s

    def exit_requested(self) -> bool:
        """Megatron's exit_interval: stop after this many steps in this process."""
        interval = self.cfg.train.exit_interval
        return interval is not None and self.state.step - self.start_step >= interval

    def run(self) -> ExitCode:
        """The loop. Returns FINISHED at max_steps, RESUME when asked to stop early (after saving)."""
        max_steps, eval_interval = self.cfg.train.max_steps, self.cfg.eval.interval
        bar = progress_bar(total=max_steps, initial=self.state.step, enabled=self.cfg.train.progress_bar and self.env.is_rank0)
        code = ExitCode.FINISHED
        try:
            while self.state.step < max_steps:
                result = self.train_step()
                bar.update(1)
                last = self.state.step == max_steps
                if self.state.step % self.cfg.train.log_interval == 0 or last:
                    self.log_step(result)
                    bar.set_postfix(loss=f"{self.last_loss:.3f}")
                if last or (eval_interval and self.state.step % eval_interval == 0):
                    self.evaluate()
                stop = not last and self.exit_requested()
                # Stopping early always saves: the resume code promises that nothing is lost.
                if stop or self.parts.policy.should_save(self.state, final=last):
                    self.save()
                if stop:
                    logger.info("exit_interval reached at step %d; exiting to be resumed", self.state.step)
                    code = ExitCode.RESUME
                    break
        finally:
            bar.close()
        return code
