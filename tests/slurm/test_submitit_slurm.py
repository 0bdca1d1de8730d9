"""Sweeps through hydra-submitit-launcher on a real one-node Slurm cluster: every point runs, a
second launch skips finished points, a preempted job (USR2) saves, requeues itself and finishes
exactly like an uninterrupted run, a time-limited job (train.exit_duration_min) requeues until done,
and a 2-task job trains with DDP like one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, read_metrics, run_cli, train_losses
from tests.helpers.slurm import RequeueReleaser, squeue, start_sweep, sweep

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

QUIET = [*TINY, "eval.sample_tokens=0", "train.log_interval=1"]


def _points(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith("p"))


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "trainrun_status.json").read_text())


def test_sweep_runs_every_point_and_a_second_launch_skips_them(slurm_env, corpus_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=4", "model.n_layers=1,2",
            "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep_dir}"]
    first = sweep(args, slurm_env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    points = _points(sweep_dir)
    assert len(points) == 4
    for point in points:
        assert _status(point)["status"] == "finished" and sorted(train_losses(point)) == [1, 2, 3, 4]
        overrides = (point / ".hydra" / "overrides.yaml").read_text()
        assert "model.n_layers" in overrides and "optim.lr" in overrides
    # The same command again: the points keep their directories (identity = hash of overrides) and
    # are skipped; one more point (n_layers=3) is new and runs.
    second = sweep([*args[:-3], "model.n_layers=1,2,3", *args[-2:]], slurm_env, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    job_logs = "".join(f.read_text() for f in (sweep_dir / ".submitit").rglob("*_log.err"))
    assert job_logs.count("finished in an earlier launch; skipping it") == 4
    assert len(_points(sweep_dir)) == 6
    assert all(len(_status(p)["attempts"]) == 1 for p in _points(sweep_dir))


def test_a_second_launch_skips_the_finished_point_and_resumes_the_killed_one(slurm_env, corpus_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=300", "checkpoint.interval=20",
              f"hydra.sweep.dir={sweep_dir}"]
    assert sweep([*common, "model.n_layers=1"], slurm_env, tmp_path).returncode == 0
    # The second point's job and the sweep command die without a chance to save (a lost node and
    # login session: SIGKILL), after step 40.
    launcher = start_sweep([*common, "model.n_layers=2"], slurm_env, tmp_path)
    killed = next(p for p in _wait_for_points(sweep_dir, 2, launcher) if not (p / "trainrun_status.json").exists())
    _wait_for_step(killed, 45, launcher)
    [(job, _, _)] = squeue(slurm_env)
    launcher.kill()
    launcher.communicate(timeout=30)
    trainer_pid = int((killed / ".trainrun.lock").read_text().split()[1])  # "pid <N> on <host>"
    os.kill(trainer_pid, signal.SIGKILL)
    subprocess.run(["scancel", job], env=slurm_env, check=False)  # and the job is gone for good
    _wait_for_empty_queue(slurm_env)
    both = sweep([*common, "model.n_layers=1,2"], slurm_env, tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    job_logs = "".join(f.read_text() for f in (sweep_dir / ".submitit").rglob("*_log.err"))
    assert job_logs.count("finished in an earlier launch; skipping it") == 1
    resumed = int((killed / "train.log").read_text().split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert resumed >= 40 and resumed % 20 == 0  # the newest checkpoint the killed job had committed
    assert sorted(train_losses(killed)) == list(range(1, 301)) and _status(killed)["status"] == "finished"


@pytest.mark.parametrize("interruption", ["usr2", "scontrol_requeue"])
def test_preempted_job_saves_requeues_and_finishes_like_an_uninterrupted_run(slurm_env, corpus_cache, tmp_path,
                                                                            interruption):
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=300", "checkpoint.interval=0"]
    reference = tmp_path / "reference"
    proc = run_cli([*common, f"hydra.run.dir={reference}"], cwd=tmp_path, env=slurm_env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sweep_dir = tmp_path / "sweep"
    with RequeueReleaser(slurm_env) as releaser:
        launcher = start_sweep([*common, f"hydra.sweep.dir={sweep_dir}"], slurm_env, tmp_path)
        run_dir = _wait_for_point(sweep_dir, launcher)
        _wait_for_step(run_dir, 20, launcher)
        [(job, state, _)] = squeue(slurm_env)
        assert state == "RUNNING"
        if interruption == "usr2":  # what Slurm's --signal=USR2@<signal_delay_s> (and submitit's _interrupt()) sends
            subprocess.run(["scancel", f"--signal={signal.SIGUSR2.name.removeprefix('SIG')}", job], env=slurm_env,
                           check=True)
        else:  # an operator's requeue: Slurm sends SIGTERM, then SIGKILL after KillWait
            subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
        out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-4000:]
    status = _status(run_dir)
    assert [a["status"] for a in status["attempts"]] == ["resume", "finished"], status
    assert releaser.released >= 1
    log = (run_dir / "train.log").read_text()
    assert f"received {'SIGUSR2' if interruption == 'usr2' else 'SIGTERM'}" in log and "resumed from" in log
    stopped_at = int(log.split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert 20 <= stopped_at < 300
    expected, got = train_losses(reference), train_losses(run_dir)
    assert sorted(got) == list(range(1, 301))
    assert got == expected  # bit for bit on CPU, before and after the requeue


def test_scancel_saves_and_the_job_stays_cancelled_until_launched_again(slurm_env, corpus_cache, tmp_path):
    """A user's ``scancel`` (SIGTERM to the job) saves and stops: trainrun does not requeue a job Slurm was
    told to cancel. Launching the same sweep again resumes it from that save."""
    sweep_dir = tmp_path / "sweep"
    args = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=300", "checkpoint.interval=0",
            f"hydra.sweep.dir={sweep_dir}"]
    launcher = start_sweep(args, slurm_env, tmp_path)
    run_dir = _wait_for_point(sweep_dir, launcher)
    _wait_for_step(run_dir, 20, launcher)
    [(job, _, _)] = squeue(slurm_env)
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    _wait_for_empty_queue(slurm_env)
    time.sleep(8)  # a requeued job would be back in the queue by now (pending, BeginTime)
    assert squeue(slurm_env) == []
    launcher.kill()  # without accounting (sacct), submitit cannot learn that a job was cancelled
    launcher.communicate(timeout=30)
    assert _status(run_dir)["status"] == "resume"
    log = (run_dir / "train.log").read_text()
    assert "received SIGTERM" in log
    job_logs = "".join(f.read_text() for f in (sweep_dir / ".submitit").rglob("*_log.err"))
    assert "a cancelled job stays cancelled" in job_logs
    saved = int(log.split("saved persistent checkpoint")[1].split("step_")[1].split(";")[0])
    again = sweep(args, slurm_env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{saved} " in (run_dir / "train.log").read_text()
    assert sorted(train_losses(run_dir)) == list(range(1, 301)) and _status(run_dir)["status"] == "finished"


def test_time_limited_job_requeues_until_done(slurm_env, corpus_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=400", "checkpoint.interval=0",
            "train.exit_duration_min=0.03", f"hydra.sweep.dir={sweep_dir}"]
    with RequeueReleaser(slurm_env):
        proc = sweep(args, slurm_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = _points(sweep_dir)
    attempts = [a["status"] for a in _status(run_dir)["attempts"]]
    assert attempts[-1] == "finished" and attempts.count("resume") >= 1 and set(attempts[:-1]) == {"resume"}
    assert sorted(train_losses(run_dir)) == list(range(1, 401))


def test_two_task_job_trains_ddp_like_one_process(slurm_env, corpus_cache, tmp_path):
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=6"]
    reference = tmp_path / "reference"
    assert run_cli([*common, f"hydra.run.dir={reference}"], cwd=tmp_path, env=slurm_env).returncode == 0
    sweep_dir = tmp_path / "sweep"
    proc = sweep([*common, "hydra.launcher.tasks_per_node=2", "parallel.dp_replicate=2",
                  f"hydra.sweep.dir={sweep_dir}"], slurm_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = _points(sweep_dir)
    assert "initializer=slurm world_size=2" in (run_dir / "train.log").read_text()
    expected, got = train_losses(reference), train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5)


def _wait_for_point(sweep_dir: Path, launcher: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        if sweep_dir.is_dir() and _points(sweep_dir):
            return _points(sweep_dir)[0]
        time.sleep(0.2)
    raise AssertionError("the job never created its run directory")


def _wait_for_points(sweep_dir: Path, count: int, launcher: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        if sweep_dir.is_dir() and len(_points(sweep_dir)) >= count:
            return _points(sweep_dir)
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} run directories appeared")


def _wait_for_empty_queue(env: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while squeue(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not squeue(env), squeue(env)


def _wait_for_step(run_dir: Path, step: int, launcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(run_dir) if "loss" in r):
            return
        time.sleep(0.1)
    raise AssertionError(f"the job never reached step {step}")


def test_preflight_rejects_a_bad_point_and_queues_nothing(slurm_env, corpus_cache, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # Two tasks per job, but the degrees of the second point describe one process.
    proc = sweep([*QUIET, f"data.path={corpus_cache}", "hydra.launcher.tasks_per_node=2",
                  "parallel.dp_replicate=2,1", f"hydra.sweep.dir={sweep_dir}"], slurm_env, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "parallel.dp_replicate=1" in proc.stderr and "world size is 2" in proc.stderr
    assert squeue(slurm_env) == [] and not (sweep_dir / ".submitit").exists()
