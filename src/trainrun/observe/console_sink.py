"""Console sink: one compact human-readable line per logged step."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from trainrun.config.schema import LoggingConfig
from trainrun.observe.sinks import Metrics
from trainrun.registry import METRIC_SINKS

# Lines go through logging (never print) so setup_logging's tqdm-aware handler keeps the bar intact.
METRICS_LOGGER = "trainrun.metrics"

# Keys with a dedicated rendering; anything else numeric is appended as "key value".
_HIDDEN = {"mem_reserved_gib", "mem_peak_gib", "step", "max_steps"}


def _human(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def _generic(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_train_line(metrics: Metrics, step: int, total_steps: int | None = None) -> str:
    """Render a training row, e.g. ``step   120/300 | loss 2.3412 | lr 9.8e-04 | ...``.

    Known keys: ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu`` (a fraction, shown
    as %), ``time_<phase>`` (ms per step), ``tflops_per_device``, ``mem_gib``, ``consumed_tokens`` and
    ``skipped_steps`` (shown when non-zero); each is shown once, only when present.
    """
    head = f"step {step:>5}" + (f"/{total_steps}" if total_steps else "")
    parts = [head]
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):.4f}")
    if "lr" in metrics:
        parts.append(f"lr {float(metrics['lr']):.1e}")
    if "grad_norm" in metrics:
        parts.append(f"grad {float(metrics['grad_norm']):.3f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{_human(float(metrics['tokens_per_s']))} tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * float(metrics['mfu']):.1f}%")
    times = [f"{k[len('time_'):]} {float(v):.1f}ms" for k, v in metrics.items() if k.startswith("time_")]
    if times:
        parts.append(" ".join(times))
    if "tflops_per_device" in metrics:
        parts.append(f"{float(metrics['tflops_per_device']):.3g} TFLOP/s/dev")
    if "mem_gib" in metrics:
        parts.append(f"mem {float(metrics['mem_gib']):.2f}GiB")
    if "consumed_tokens" in metrics:
        parts.append(f"{_human(float(metrics['consumed_tokens']))} tokens")
    if metrics.get("skipped_steps"):
        parts.append(f"skipped {int(metrics['skipped_steps'])}")
    shown = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib", "tflops_per_device", "consumed_tokens",
             "skipped_steps"} | _HIDDEN
    parts += [f"{k} {_generic(v)}" for k, v in metrics.items() if k not in shown and not k.startswith("time_")]
    return " | ".join(parts)


def format_eval_line(metrics: Metrics, step: int, prefix: str = "val") -> str:
    """Render an evaluation row, e.g. ``eval step 100 | val_loss 2.4100 | ppl 11.14`` (``prefix="test"``: the
    test row, ``test step 300 | test_loss ...``).

    ``ppl`` is ``<prefix>_ppl`` when given, else ``exp(<prefix>_loss)``.
    """
    loss = float(metrics[f"{prefix}_loss"])
    ppl = float(metrics[f"{prefix}_ppl"]) if f"{prefix}_ppl" in metrics else _safe_exp(loss)
    parts = [f"{'eval' if prefix == 'val' else prefix} step {step}", f"{prefix}_loss {loss:.4f}", f"ppl {ppl:.2f}"]
    parts += [f"{k} {_generic(v)}" for k, v in metrics.items()
              if k not in {f"{prefix}_loss", f"{prefix}_ppl"} | _HIDDEN]
    return " | ".join(parts)


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # a diverged run's loss; inf is the honest answer
        return math.inf


class ConsoleSink:
    """Logs one line per call to the ``trainrun.metrics`` logger at INFO."""

    def __init__(self, total_steps: int | None = None, logger: logging.Logger | None = None):
        self.total_steps = total_steps
        self._logger = logger or logging.getLogger(METRICS_LOGGER)

    def log(self, metrics: Metrics, step: int) -> None:
        """Format and log ``metrics`` as an eval line (if it has ``val_loss``) or a train line."""
        if "val_loss" in metrics:
            line = format_eval_line(metrics, step)
        elif "test_loss" in metrics:
            line = format_eval_line(metrics, step, prefix="test")
        else:
            line = format_train_line(metrics, step, self.total_steps)
        self._logger.info(line)

    def log_config(self, config: dict[str, Any]) -> None:
        """Pick up ``train.max_steps`` so lines read ``step 120/300``."""
        train = config.get("train")
        if self.total_steps is None and isinstance(train, dict) and isinstance(train.get("max_steps"), int):
            self.total_steps = train["max_steps"]

    def close(self) -> None:
        """Nothing to release."""


@METRIC_SINKS.register("console", switch="logging.console")
def build_console_sink(cfg: LoggingConfig, run_dir: Path) -> ConsoleSink:
    """Registry factory for :class:`ConsoleSink`."""
    return ConsoleSink()
