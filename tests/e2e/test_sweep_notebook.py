"""The sweep notebook executes end to end on a small sweep the test creates."""

from __future__ import annotations

import pytest

from tests.helpers.cli import TINY, execute_notebook, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_sweep_notebook_analyses_a_sweep(tmp_path, corpus_cache, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=4",
                    "train.log_interval=1", "eval.interval=2", "optim.lr=1e-3,3e-3,1e-2",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = execute_notebook("analyze_sweep.ipynb", monkeypatch, TRAINRUN_SWEEP_DIR=str(sweep_dir))
    assert "3 points" in printed
    for lr in ("0.001", "0.003", "0.01"):
        assert f"lr {float(lr):.3g}: final val_loss" in printed
    assert (sweep_dir / "sweep_curves.png").stat().st_size > 10_000
