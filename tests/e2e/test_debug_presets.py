"""Every debug preset (conf/debug/) runs from the CLI and does what it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, run_cli, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.seq_len=32", "data.max_documents=400",
         "train.progress_bar=false"]
"""A model small enough for seconds; the presets set steps, batches and evaluation themselves."""


def _run(preset: str, run_dir: Path, corpus_cache: Path, *extra: str):
    proc = run_cli([f"debug={preset}", *SMALL, f"data.path={corpus_cache}", f"hydra.run.dir={run_dir}", *extra],
                   cwd=run_dir.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fast_runs_a_few_steps_and_no_sample(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    proc = _run("fast", run_dir, corpus_cache)
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert [row["step"] for row in read_metrics(run_dir) if "val_loss" in row] == [3]
    assert "--- sample ---" not in proc.stdout
    assert (run_dir / "checkpoints" / "step_3").is_dir()


def test_overfit_drives_the_loss_towards_zero(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    _run("overfit", run_dir, corpus_cache, "train.micro_batch_size=8", "train.max_steps=120", "train.log_interval=20")
    losses = train_losses(run_dir)
    assert losses[20] > 1.0, losses  # it starts from real data, not a trivially easy batch
    assert losses[120] < 0.5, losses


def test_profile_writes_a_trace_of_the_window(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    _run("profile", run_dir, corpus_cache)
    traces = sorted((run_dir / "profile").glob("trace_rank0_step*.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep" in str(e.get("name", "")) for e in events)


def test_nan_steps_are_skipped_and_the_run_finishes(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    proc = _run("nan", run_dir, corpus_cache)
    rows = {row["step"]: row for row in read_metrics(run_dir) if "loss" in row}
    assert rows[2]["skipped_steps"] == 0 and rows[4]["skipped_steps"] == 2 and rows[8]["skipped_steps"] == 2
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (5, 6, 7, 8))  # finite (not NaN) again
    assert "step 3 skipped" in proc.stderr + (run_dir / "train.log").read_text()
