"""Sweeps (-m) with Hydra's basic launcher: pre-flight checks, point identity, skip-finished, the exit code."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, TINY, cli_env, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _points(sweep_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "trainrun_status.json").read_text())
            for p in sorted(sweep_dir.iterdir()) if (p / "trainrun_status.json").is_file()}


def test_sweep_points_have_stable_directories_and_a_second_launch_skips_finished_ones(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=2",
            "model.n_layers=1,2", f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pre-flight: 2 sweep point(s) compose, validate and have writable directories" in first.stderr
    points = _points(sweep_dir)
    assert len(points) == 2 and all(s["status"] == "finished" for s in points.values())
    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stderr.count("finished in an earlier launch; skipping it") == 2
    assert _points(sweep_dir) == points  # no new attempt recorded


def test_a_second_launch_resumes_the_unfinished_point(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    common = ["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=4",
              f"hydra.sweep.dir={sweep_dir}"]
    assert run_cli([*common, "model.n_layers=1"], cwd=tmp_path).returncode == 0
    # Stopped early after saving (exit 3): how a run is driven is not part of the point's identity.
    assert run_cli([*common, "model.n_layers=2", "train.exit_interval=2"], cwd=tmp_path).returncode == 3
    both = run_cli([*common, "model.n_layers=1,2"], cwd=tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    assert both.stderr.count("finished in an earlier launch; skipping it") == 1
    statuses = sorted([a["status"] for a in s["attempts"]] for s in _points(sweep_dir).values())
    assert statuses == [["finished"], ["resume", "finished"]]
    assert "resumed from" in both.stderr


def test_preflight_rejects_a_bad_point_before_any_runs(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, f"data.path={corpus_cache}", "model.n_heads=4,3", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("trainrun:")]
    assert "sweep point p" in line and "model.n_heads=3" in line and "must divide model.d_model=64" in line
    assert not sweep_dir.exists()  # nothing ran, not even the good point


def test_preflight_checks_every_points_directories_before_any_runs(tmp_path, corpus_cache):
    blocker = tmp_path / "a-file"  # a directory cannot be made below a file, even as root
    blocker.write_text("")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, f"data.path={corpus_cache}", "train.max_steps=2",
                    f"checkpoint.dir={tmp_path / 'good'},{blocker / 'ckpt'}", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("trainrun:")]
    assert line.startswith("trainrun: environment error: checkpoint.dir is not writable")
    assert str(blocker / "ckpt") in line and "set checkpoint.dir to a directory you can write to" in line
    assert not list(sweep_dir.glob("*/trainrun_status.json"))  # the good point did not run either


def test_preflight_refuses_a_point_that_does_not_fit_the_device_memory(tmp_path):
    # dry_run: should the check miss, the points only plan, they never train a 1.3B model on this CPU
    proc = run_cli(["-m", "experiment=gpt_1b", "run.dry_run=true", "run.device_memory_gib=80",
                    "train.micro_batch_size=1,32", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 2
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("trainrun:")]
    assert "train.micro_batch_size=32" in line and "exceed run.device_memory_gib=80" in line


def test_points_that_would_share_a_directory_are_refused(tmp_path, corpus_cache):
    proc = run_cli(["-m", *TINY, f"data.path={corpus_cache}", "train.exit_interval=2,3",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "share the run directory" in proc.stderr and "exclude_keys" in proc.stderr


def test_a_point_stopped_early_makes_the_sweep_exit_3(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=2,6",
                    "train.exit_interval=3", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert sorted(s["status"] for s in _points(sweep_dir).values()) == ["finished", "resume"]
    assert "[train.max_steps=6]: stopped early, resume me (exit 3)" in proc.stderr
    assert "[train.max_steps=2]: finished (exit 0), val_loss " in proc.stderr


def test_report_tables_every_point_with_csv_and_png(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=2,6",
                    "optim.lr=1e-3,3e-3", "train.exit_interval=3", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    report = run_cli([str(sweep_dir)], cwd=tmp_path, module="trainrun.launch.report")
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0].split()[:3] == ["point", "overrides", "status"] and len(lines) >= 5
    with open(sweep_dir / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    statuses = sorted(r["status"] for r in rows)
    assert statuses == ["finished", "finished", "requeued 1 times", "requeued 1 times"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert all(float(r["final_val_loss"]) > 0 and float(r["wall_time_s"]) > 0 for r in finished)
    assert all("optim.lr=" in r["overrides"] and r["point"].startswith("p") for r in rows)
    png = (sweep_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# Each point's outcome comes from a real run: a crash inside the training loop (tests/e2e/crash_schedule.py,
# an LR schedule of a plugin module named by run.plugins), non-finite steps (exit 4), a normal finish.
CRASH_PLUGIN = "run.plugins=[tests.e2e.crash_schedule]"


def plugin_env() -> dict[str, str]:
    """cli_env with the repository root importable, so ``run.plugins`` can name tests.e2e.crash_schedule."""
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env["PYTHONPATH"]])
    return env


@pytest.mark.slow
def test_a_crashed_point_is_summed_up_with_the_others_and_the_sweep_exits_1(tmp_path, corpus_cache):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "eval.sample_tokens=0", f"data.path={corpus_cache}", "train.max_steps=3",
                    CRASH_PLUGIN, "debug.inject_nan_at_steps=[1]", "optim.schedule=cosine,crash_at_2",
                    "train.max_skipped_steps=1,3", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=plugin_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr  # Hydra's re-raise after the batch: no summary came after it
    summary = [line for line in proc.stderr.splitlines() if line.startswith("trainrun: sweep point p")
               and "]: " in line]
    assert len(summary) == 4, proc.stderr[-3000:]
    outcome = {line.split(" [", 1)[1].split("]", 1)[0]: line.split("]: ", 1)[1] for line in summary}
    assert outcome["optim.schedule=cosine train.max_skipped_steps=3"].startswith("finished (exit 0), val_loss ")
    assert outcome["optim.schedule=crash_at_2 train.max_skipped_steps=3"].startswith("crashed (exit 1), see ")
    assert outcome["optim.schedule=cosine train.max_skipped_steps=1"].startswith("non-finite steps (exit 4)")
    assert outcome["optim.schedule=crash_at_2 train.max_skipped_steps=1"].startswith("non-finite steps (exit 4)")
    statuses = sorted((s["status"], s["exit_code"]) for s in _points(sweep_dir).values())
    assert statuses == [("bad_steps", 4), ("bad_steps", 4), ("failed", 1), ("finished", 0)]
    crashed = next(p for p, s in _points(sweep_dir).items() if s["exit_code"] == 1)
    assert "RuntimeError: crash_at_2: injected crash at step 2" in (sweep_dir / crashed / "train.log").read_text()
    assert "Traceback" in proc.stderr  # the crash's own traceback still shows, once, above the summary
