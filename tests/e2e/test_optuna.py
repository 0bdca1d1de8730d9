"""hparams_search: an Optuna study through trainrun's sweeper, with a failing trial, resumed by a second launch;
searches that cannot work refused up front, and every trial told (the study in <sweep dir>/optuna.db is checked)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from tests.e2e.test_sweep import CRASH_PLUGIN, plugin_env
from tests.helpers.cli import TINY, run_cli

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


def _trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """The study as the sweeper stored it (its default storage: <sweep dir>/optuna.db)."""
    return optuna.load_study(study_name="trainrun", storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials


def _trainrun_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("trainrun:")]


@pytest.mark.parametrize(("override", "expected"), [
    ("model.d_model=65", "model.n_heads=4: must divide model.d_model=65"),
    ("logging.jsonl=false", "logging.jsonl=False: an Optuna search reads each trial's objective from metrics.jsonl"),
    ("run.dry_run=true", "run.dry_run=True: a dry run trains nothing"),
    ("hydra.sweeper.sampler=grid", "hydra.sweeper.sampler='grid': use one of tpe, random"),
])
def test_a_search_every_trial_of_which_would_fail_is_refused_before_the_study(tmp_path, corpus_cache, override,
                                                                              expected):
    sweep_dir = tmp_path / "study"
    proc = run_cli(["-m", "hparams_search=optuna_lr", *TINY, f"data.path={corpus_cache}", "train.max_steps=2",
                    override, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = _trainrun_lines(proc.stderr)
    assert line.startswith("trainrun: configuration error: ") and expected in line, line
    assert "Traceback" not in proc.stderr
    assert not (sweep_dir / "optuna.db").exists() and not list(sweep_dir.glob("p*"))  # no study, no trial ran


def test_a_search_whose_trials_all_crash_tells_them_failed_and_exits_1(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "study"
    proc = run_cli(["-m", "hparams_search=optuna_lr", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}",
                    "train.max_steps=3", CRASH_PLUGIN, "optim.schedule=crash_at_2", "hydra.sweeper.n_trials=2",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=plugin_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [(t.state.name, t.user_attrs["exit_code"]) for t in _trials(sweep_dir)] == [("FAIL", 1), ("FAIL", 1)]
    told = [line for line in _trainrun_lines(proc.stderr) if line.startswith("trainrun: trial ")]
    assert len(told) == 2 and all(" failed, sweep point p" in line and "crashed (exit 1)" in line for line in told)
    assert "no trial of study trainrun finished (2 failed)" in proc.stderr
    assert "Error executing job" not in proc.stderr and not (sweep_dir / "optuna_best.yaml").exists()


def test_a_trial_left_running_by_a_killed_sweeper_is_settled_and_resumed(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "study"
    sweep_dir.mkdir()
    study = optuna.create_study(study_name="trainrun", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    # What a sweeper killed mid-trial leaves: a RUNNING trial (this one from a trainrun that recorded nothing)
    killed = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                        "optim.warmup_steps": optuna.distributions.CategoricalDistribution(["0", "20", "50"])})
    proc = run_cli(["-m", "hparams_search=optuna_lr", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}",
                    "train.max_steps=2", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trial 0 was left running by a sweeper that is gone; told FAIL, its parameters queued again" in proc.stderr
    old, resumed = _trials(sweep_dir)
    assert old.state.name == "FAIL" and resumed.state.name == "COMPLETE" and resumed.params == killed.params
    assert resumed.user_attrs["resumes_trial"] == 0 and math.isfinite(resumed.value)


def test_an_objective_no_trial_logs_stops_the_search_with_exit_2(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "study"
    proc = run_cli(["-m", "hparams_search=optuna_lr", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}",
                    "train.max_steps=2", "hydra.sweeper.objective=val_los", "hydra.sweeper.n_trials=3",
                    f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _trainrun_lines(proc.stderr)[-1]
    assert line.startswith("trainrun: configuration error: hydra.sweeper.objective='val_los': trial 0 finished")
    assert [t.state.name for t in _trials(sweep_dir)] == ["FAIL"]  # one trial told, no more launched
