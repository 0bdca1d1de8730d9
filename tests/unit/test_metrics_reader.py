"""One reader of metrics.jsonl (trainrun.observe.analysis) for every tool, and how a search tells its trials.

Whatever state a run left its metrics.jsonl in (missing, torn by a kill, non-finite values written
as null, rows re-run after a resume), the reader answers; the Optuna sweeper reads a trial's
objective through it and tells every trial it asked, never leaving one RUNNING.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.trainrun_optuna.sweeper import RESUMES, TrainrunOptunaSweeper, trial_result
from trainrun.exit_codes import ExitCode
from trainrun.launch.run_status import record_status
from trainrun.observe.analysis import has_key, last_value, load_metrics, read_rows, summarize

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _write(run_dir: Path, text: str) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_a_missing_file_reads_as_no_rows(tmp_path):
    metrics = load_metrics(tmp_path)
    assert metrics.train == [] and metrics.eval == [] and not metrics.found
    assert read_rows(tmp_path / "metrics.jsonl") == []
    assert last_value(metrics, "val_loss") is None and not has_key(metrics, "val_loss")
    assert summarize(metrics)["best_val_loss"] is None


def test_torn_and_foreign_lines_are_skipped_and_a_resume_keeps_the_last_row(tmp_path):
    run_dir = _write(tmp_path, "\n".join([
        '{"step": 1, "loss": 3.0}',
        '{"step": 2, "loss": 2.9}',
        '{"step": 2, "val_loss": 2.95}',
        '{"step": 3, "lo',  # killed mid-write; the next attempt starts on a fresh line
        '{"step": 2, "loss": 2.5}',  # step 2 re-run after the resume
        '[1, 2]',
        '{"loss": 1.0}',
        '{"step": "3", "loss": 1.0}',
        '{"step": 3, "loss": 2.4}',
        '{"step": 4, "val_l',  # and torn again at the very end
    ]))
    metrics = load_metrics(run_dir)
    assert [(r["step"], r["loss"]) for r in metrics.train] == [(1, 3.0), (2, 2.5), (3, 2.4)]
    assert [r["step"] for r in metrics.eval] == [2] and metrics.found
    assert last_value(metrics, "loss") == 2.4 and last_value(metrics, "val_loss") == 2.95


def test_non_finite_values_written_as_null_are_not_a_number_to_anyone(tmp_path):
    run_dir = _write(tmp_path, "\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0, "tokens_per_s": None},
        {"step": 2, "val_loss": 2.0},
        {"step": 3, "loss": None, "tokens_per_s": 10.0},
        {"step": 4, "val_loss": None},
    ]) + "\n")
    metrics = load_metrics(run_dir)
    assert has_key(metrics, "val_loss") and last_value(metrics, "val_loss") is None  # the last one was NaN
    summary = summarize(metrics)
    assert summary["best_val_loss"] == 2.0 and summary["median_tokens_per_s"] == 10.0


@pytest.mark.parametrize(("rows", "code", "value", "told"), [
    (None, ExitCode.FINISHED, None, ExitCode.FAILED),  # logging.jsonl=false, or the file was removed
    ([{"step": 3, "loss": 2.0}], ExitCode.FINISHED, None, ExitCode.CONFIG_ERROR),  # no such objective
    ([{"step": 3, "val_loss": None}], ExitCode.FINISHED, None, ExitCode.BAD_STEPS),
    ([{"step": 3, "val_loss": 2.5}], ExitCode.BAD_STEPS, None, ExitCode.BAD_STEPS),
    ([{"step": 3, "val_loss": 2.5}], ExitCode.FAILED, None, ExitCode.FAILED),
    ([{"step": 3, "val_loss": 2.5}], ExitCode.FINISHED, 2.5, ExitCode.FINISHED),
])
def test_a_trial_that_cannot_report_is_a_failed_trial(tmp_path, rows, code, value, told):
    if rows is not None:
        _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "val')
    result = trial_result(code, tmp_path, "val_loss")
    assert result.value == value and result.code == told
    assert result.objective_missing == (told == ExitCode.CONFIG_ERROR)


def _sweeper() -> TrainrunOptunaSweeper:
    return TrainrunOptunaSweeper(direction="minimize", objective="val_loss", n_trials=3, n_jobs=1, sampler="random",
                                 seed=0, study_name="t", storage=None, params={})


def _dead_pid() -> int:
    """A pid no process has: one above the kernel's largest."""
    pid_max = Path("/proc/sys/kernel/pid_max")
    return (int(pid_max.read_text()) if pid_max.is_file() else 2**22) + 1


def test_trials_left_running_by_a_dead_sweeper_are_settled(tmp_path, capsys):
    study = optuna.create_study(direction="minimize")
    here_dead, elsewhere = f"{socket.gethostname()}:{_dead_pid()}", "another-host:1"
    # 0: its point finished before the sweeper died: told its objective, no work lost
    finished = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    finished.set_user_attr("sweeper", here_dead)
    finished.set_user_attr("point", "pdone")
    _write(tmp_path / "pdone", '{"step": 3, "val_loss": 2.5}\n')
    record_status(tmp_path / "pdone", "finished", 0)
    # 1: killed mid-run: FAIL, and its parameters queued again so the next launch resumes its point
    killed = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    killed.set_user_attr("sweeper", here_dead)
    killed.set_user_attr("point", "pkilled")
    _write(tmp_path / "pkilled", '{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    # 2: asked by an older trainrun that recorded nothing
    study.ask()
    # 3 and 4: a sweeper still alive here (this test), and one on another host: left alone
    alive = study.ask()
    alive.set_user_attr("sweeper", f"{socket.gethostname()}:{os.getppid()}")
    remote = study.ask()
    remote.set_user_attr("sweeper", elsewhere)

    _sweeper()._settle_stale(study, tmp_path)

    states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "FAIL", 3: "RUNNING", 4: "RUNNING", 5: "WAITING"}
    assert study.trials[0].value == 2.5
    queued = study.trials[5]
    assert queued.user_attrs[RESUMES] == 1 and queued.system_attrs["fixed_params"] == killed.params
    err = capsys.readouterr().err
    assert err.count("left running by a sweeper that is gone") == 3 and err.count("queued again") == 1
    assert _sweeper()._counted(study) == 2  # 0 and 2; 1 is resumed by 5 and counts once that one is told


def test_an_interrupted_batch_tells_every_trial_it_asked(tmp_path, monkeypatch):
    class Interrupting:  # Ctrl-C while the launcher runs the batch
        def launch(self, batch, initial_job_idx):
            raise KeyboardInterrupt

    study = optuna.create_study(direction="minimize")
    sweeper = _sweeper()
    sweeper.launcher = Interrupting()
    monkeypatch.setattr("hydra_plugins.trainrun_optuna.sweeper.preflight",
                        lambda config, points, world_size, distinct: [("p1", _Cfg())])
    space = OverridesParser.create().parse_overrides(["optim.lr=tag(log, interval(1e-4, 1e-2))"])
    with pytest.raises(KeyboardInterrupt):
        sweeper._run_batch(study, space, ["train.max_steps=3"], tmp_path, 1, size=2)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert [t.user_attrs.get(RESUMES) for t in trials[2:]] == [0, 1]
    assert [t.params for t in trials[:2]] == [t.system_attrs["fixed_params"] for t in trials[2:]]  # resumed next


class _Cfg:
    """Just what check_objective_readable looks at."""

    class logging:  # noqa: N801 - mirrors TrainRunConfig's field
        jsonl = True

    class run:  # noqa: N801
        dry_run = False
