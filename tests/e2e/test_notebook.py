"""The run-analysis notebook executes end to end on a real run directory."""

from __future__ import annotations

import pytest

from tests.helpers.cli import TINY, execute_notebook, run_cli
from trainrun.observe.analysis import load_metrics, summarize

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_notebook_analyses_a_run(tmp_path, corpus_cache, monkeypatch):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, f"data.path={corpus_cache}", "train.max_steps=6", "train.log_interval=2",
                    "eval.interval=3", "checkpoint.interval=0", "eval.sample_tokens=0", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(run_dir / "metrics.jsonl", "a") as fh:  # a resume re-logs step 6, and a kill tore a line
        fh.write('{"step": 6, "loss": 1.25, "lr": 0.001}\n{"step": 7, "lo')
    metrics = load_metrics(run_dir)
    assert [r["step"] for r in metrics.train] == [2, 4, 6] and metrics.train[-1]["loss"] == 1.25
    assert [r["step"] for r in metrics.eval] == [3, 6]
    assert summarize(metrics)["best_val_loss"] == min(r["val_loss"] for r in metrics.eval)

    printed = execute_notebook("analyze_run.ipynb", monkeypatch, TRAINRUN_RUN_DIR=str(run_dir))
    assert "3 training rows, 2 evaluations" in printed and "final_loss: 1.25" in printed
    assert (run_dir / "loss.png").stat().st_size > 1000
