"""Read a run directory back for analysis (notebooks, scripts): metrics, summary, plots."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunMetrics:
    """Training and evaluation rows of one run, one row per step (the last one written wins)."""

    train: list[dict]
    eval: list[dict]


def load_metrics(run_dir: Path | str) -> RunMetrics:
    """Parse ``metrics.jsonl``; steps re-run after a resume keep their last row, a torn last line is skipped."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        (evals if "val_loss" in row else train)[row["step"]] = row
    return RunMetrics([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)])


def summarize(metrics: RunMetrics) -> dict[str, float | int | None]:
    """Headline numbers of a run: steps, losses, throughput, time per phase."""
    train, evals = metrics.train, metrics.eval
    steady = train[1:] or train  # the first window includes warm-up (allocations, first batches)
    summary: dict[str, float | int | None] = {
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1]["loss"] if train else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(r["val_loss"] for r in evals) if evals else None,
        "skipped_steps": train[-1].get("skipped_steps", 0) if train else 0,
    }
    for key in ("tokens_per_s", "mfu", "time_data", "time_step"):
        values = [r[key] for r in steady if r.get(key) is not None]
        summary[f"median_{key}"] = statistics.median(values) if values else None
    return summary


def plot_run(metrics: RunMetrics, path: Path | str) -> Path:
    """Save loss / validation loss and learning rate against step as a PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in metrics.train]
    ax_loss.plot(steps, [r["loss"] for r in metrics.train], label="train loss")
    if metrics.eval:
        ax_loss.plot([r["step"] for r in metrics.eval], [r["val_loss"] for r in metrics.eval], "o-", label="val loss")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in metrics.train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
