"""Per-source and test losses as the readers of metrics.jsonl see them: summaries, trainrun-report, Optuna."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainrun.launch.report import main as report_main
from trainrun.observe.analysis import has_key, last_value, load_metrics, summarize


def _run(directory: Path, val: float, test: float) -> Path:
    (directory / ".hydra").mkdir(parents=True)
    rows = [
        {"step": 10, "loss": 3.0, "tokens_per_s": 100.0, "samples/web": 224, "samples/code": 96},
        {"step": 10, "val_loss": val, "val_loss/web": val - 0.1, "val_loss/code": val + 0.2},
        {"step": 10, "test_loss": test, "test_loss/web": test - 0.1, "test_loss/code": test + 0.2},
    ]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_the_test_row_is_its_own_kind_and_every_key_is_readable(tmp_path) -> None:
    metrics = load_metrics(_run(tmp_path / "run", 2.0, 2.5))
    assert metrics.train[0]["loss"] == 3.0  # the test row, logged at the last step, replaces no training row
    assert [r["test_loss"] for r in metrics.test] == [2.5]
    summary = summarize(metrics)
    assert summary["test_loss"] == 2.5 and summary["final_val_loss/web"] == pytest.approx(1.9)
    for key, value in (("test_loss", 2.5), ("val_loss/code", 2.2), ("test_loss/web", 2.4), ("samples/web", 224)):
        assert has_key(metrics, key) and last_value(metrics, key) == pytest.approx(value)  # an Optuna objective


def test_report_sorts_a_sweep_by_any_loss(tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    _run(sweep / "0", val=2.0, test=2.9)
    _run(sweep / "1", val=2.1, test=2.4)
    assert report_main([str(sweep), "--no-png"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "test_loss" in table[0] and table[1].startswith("0 ")  # lowest final val_loss first
    assert report_main([str(sweep), "--no-png", "--sort-by", "test_loss"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("1 ")
    assert report_main([str(sweep), "--no-png", "--sort-by", "final_val_loss/code"]) == 0
    assert report_main([str(sweep), "--no-png", "--sort-by", "val_los"]) == 2
    assert "final_val_loss/code" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "objective", "says"), [
    ([], "test_loss", "no trial evaluates a test set"),
    (["data=stdlib_blend", "eval.test=false"], "test_loss", "no trial evaluates a test set"),
    (["data=stdlib_blend"], "val_loss/librry", "no evaluated source is named 'librry'"),
    ([], "val_loss/stdlib", "no evaluated source"),
    (["data=stdlib_blend"], "test_loss/tests", None),
    (["data=stdlib_blend"], "val_loss/library", None),
    (['data.split="90,5,5"'], "test_loss", None),
])
def test_an_optuna_objective_the_trials_would_never_log_is_refused_up_front(overrides, objective, says) -> None:
    from hydra_plugins.trainrun_optuna.sweeper import check_objective_readable
    from trainrun.config import compose_config
    from trainrun.errors import ConfigError

    cfg = compose_config(overrides)
    if says is None:
        check_objective_readable(cfg, objective)
        return
    with pytest.raises(ConfigError, match=says) as err:
        check_objective_readable(cfg, objective)
    assert err.value.field == "hydra.sweeper.objective"
