"""hparams_search: an Optuna study through trainrun's sweeper, with a failing trial, resumed by a second launch."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.conftest import TINY, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_study_records_failed_trials_reports_the_best_and_resumes(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "study"
    # max_skipped_steps=1 with a NaN at step 1 exits 4 (a diverged trial); 3 finishes.
    args = ["-m", "hparams_search=optuna_lr", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}",
            "train.max_steps=3", "debug.inject_nan_at_steps=[1]", "train.max_skipped_steps=choice(1,3)",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli([*args, "hydra.sweeper.n_trials=3"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optuna_best.yaml").read_text())
    assert best["trials"] == 3 and best["failed"] >= 1 and math.isfinite(best["best_value"])
    assert best["best_params"]["train.max_skipped_steps"] == "3"
    assert "trainrun: best trial" in first.stdout
    second = run_cli([*args, "hydra.sweeper.n_trials=5"], cwd=tmp_path)  # the study in optuna.db continues
    assert second.returncode == 0, second.stderr[-3000:]
    assert yaml.safe_load((sweep_dir / "optuna_best.yaml").read_text())["trials"] == 5
