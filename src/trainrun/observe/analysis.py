"""Read a run directory back for analysis (notebooks, scripts): metrics, summary, plots."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from trainrun.extras import require
from trainrun.observe.jsonl_sink import METRICS_FILE


@dataclass
class RunMetrics:
    """Training and evaluation rows of one run, one row per step (the last one written wins)."""

    train: list[dict]
    eval: list[dict]
    found: bool = True
    """The run directory holds a metrics.jsonl (none: ``logging.jsonl=false``, or the run never started)."""
    test: list[dict] = field(default_factory=list)
    """The test evaluation of a finished run (``test_loss``; at most one row per step)."""


def read_rows(path: Path | str) -> list[dict]:
    """Every complete row of a metrics.jsonl, in file order; [] when the file does not exist.

    The one parser of metrics.jsonl (sweep summaries, searches, reports, notebooks read through it).
    A line that is not a whole JSON object with an integer ``step`` is skipped: a run killed while
    writing leaves its last line half-written, and the next attempt starts on a fresh line after it.
    Non-finite values are written as ``null`` and read back as ``None``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def load_metrics(run_dir: Path | str) -> RunMetrics:
    """Parse ``<run_dir>/metrics.jsonl`` (see :func:`read_rows`); steps re-run after a resume keep their last row.

    A missing file gives no rows and ``found=False``.
    """
    path = Path(run_dir) / METRICS_FILE
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    tests: dict[int, dict] = {}
    for row in read_rows(path):
        kind = evals if "val_loss" in row else tests if "test_loss" in row else train
        kind[row["step"]] = row
    return RunMetrics([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], found=path.is_file(),
                      test=[tests[s] for s in sorted(tests)])


def has_key(metrics: RunMetrics, key: str) -> bool:
    """Some row of the run logged ``key`` (even as a non-finite ``null``)."""
    return any(key in row for row in (*metrics.train, *metrics.eval, *metrics.test))


def last_value(metrics: RunMetrics, key: str) -> float | None:
    """``key`` of the latest step that logged it, as a float; None when no row has it or it was non-finite."""
    rows = sorted((row for row in (*metrics.train, *metrics.eval, *metrics.test) if key in row),
                  key=lambda row: row["step"])
    if not rows:
        return None
    value = rows[-1][key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _finite(values: list) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def summarize(metrics: RunMetrics) -> dict[str, float | int | None]:
    """Headline numbers of a run: steps, losses, throughput, time per phase (non-finite values are left out)."""
    train, evals = metrics.train, metrics.eval
    steady = train[1:] or train  # the first window includes warm-up (allocations, first batches)
    val_losses = _finite([r.get("val_loss") for r in evals])
    summary: dict[str, float | int | None] = {
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1].get("loss") if train else None,
        "final_val_loss": evals[-1].get("val_loss") if evals else None,
        "best_val_loss": min(val_losses) if val_losses else None,
        "skipped_steps": train[-1].get("skipped_steps", 0) if train else 0,
        "test_loss": metrics.test[-1].get("test_loss") if metrics.test else None,
    }
    if evals:  # per-source losses of a blend, as of the last evaluation
        summary.update({f"final_{k}": v for k, v in evals[-1].items() if k.startswith("val_loss/")})
    for key in ("tokens_per_s", "mfu", "time_data", "time_step"):
        values = _finite([r.get(key) for r in steady])
        summary[f"median_{key}"] = statistics.median(values) if values else None
    return summary


def plot_run(metrics: RunMetrics, path: Path | str) -> Path:
    """Save loss / validation loss and learning rate against step as a PNG; return its path."""
    require("matplotlib", "report", "plot_run")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in metrics.train]
    ax_loss.plot(steps, [r.get("loss") for r in metrics.train], label="train loss")
    if metrics.eval:
        ax_loss.plot([r["step"] for r in metrics.eval], [r.get("val_loss") for r in metrics.eval], "o-",
                     label="val loss")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r.get("lr") for r in metrics.train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
