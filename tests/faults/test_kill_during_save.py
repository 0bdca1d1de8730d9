"""Kills and signals that land inside a save, on purpose, and saves that keep failing.

The random SIGKILL test (test_sigkill.py) cannot promise that any kill lands in a save; these
tests watch the checkpoint directory and strike while a save is in a given phase, then check the
kill did land there (the temporary directory is still on disk) before checking that nothing
committed was lost and the resumed run finishes with the losses of an uninterrupted run.

Phases: ``write`` (``.tmp_step_N/`` exists: DCP is writing shards) and ``commit`` (its
``trainrun.json`` exists: rank 0 is hashing, writing the manifest and renaming).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.faults import (
    MAX_STEPS,
    base_args,
    fault_env,
    frozen,
    launch,
    log_since,
    log_size,
    losses,
    output,
    run_to_end,
    worker_pids,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

KEEP_LAST = 2


def _in_phase(ckpt: Path, phase: str) -> Path | None:
    """The temporary checkpoint directory if a save is in ``phase`` right now."""
    for tmp in ckpt.glob(".tmp_step_*") if ckpt.is_dir() else ():
        if phase == "write" or (tmp / "trainrun.json").exists():
            return tmp
    return None


def _strike_during_save(proc: subprocess.Popen, ckpt: Path, phase: str, strike, skip_saves: int = 1) -> Path:
    """Wait until a save after the first ``skip_saves`` reaches ``phase``, then call ``strike()``; return that
    temp dir.

    A short phase (the commit of a tiny model takes milliseconds) can end between the poll that sees it and
    the strike. So the processes are frozen with SIGSTOP first and the phase is checked again while nothing
    runs: the strike then lands inside the phase for certain, and a phase that had already ended is let go
    (SIGCONT) and the next save is tried.
    """
    seen: set[str] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = _in_phase(ckpt, phase)
        if tmp is not None and tmp.name not in seen:
            seen.add(tmp.name)
            if len(seen) > skip_saves:
                with frozen(proc):  # a signal sent to a stopped process is delivered when it continues
                    if _in_phase(ckpt, phase) == tmp:
                        strike()
                        return tmp
        time.sleep(0.0005)
    raise AssertionError(f"no save reached phase {phase} (saves seen: {sorted(seen)}):\n{output(proc)[-3000:]}")


def _checkpoints(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_"))


@pytest.fixture(scope="module")
def two_process_reference(corpus_cache, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference2")
    args = base_args(corpus_cache, run_dir, "parallel.dp_replicate=2", "checkpoint.interval=0",
                     "checkpoint.save_final=false")
    assert run_to_end(args, run_dir, nproc=2) == 0
    return losses(run_dir)


@pytest.mark.parametrize(("nproc", "target", "phase"), [
    (1, "process", "write"),
    (1, "process", "commit"),
    pytest.param(2, "worker1", "write", marks=pytest.mark.distributed),
    pytest.param(2, "all", "commit", marks=pytest.mark.distributed),
])
def test_sigkill_during_a_save_loses_nothing_committed(tmp_path, corpus_cache, reference_losses, request,
                                                       nproc, target, phase):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    two = ["parallel.dp_replicate=2"] if nproc == 2 else []
    args = base_args(corpus_cache, run_dir, *two, "checkpoint.interval=2", f"checkpoint.keep_last={KEEP_LAST}")
    proc = launch(args, run_dir, nproc)

    def strike() -> None:
        if target == "process":
            proc.kill()
        elif target == "worker1":
            os.kill(worker_pids(proc)[1], signal.SIGKILL)  # torchrun then stops the other worker
        else:  # the whole job at once, as Slurm does at the end of KillWait
            for pid in [proc.pid, *worker_pids(proc).values()]:
                os.kill(pid, signal.SIGKILL)

    tmp = _strike_during_save(proc, ckpt, phase, strike, skip_saves=2)
    proc.wait(timeout=90)
    assert tmp.exists(), "the kill did not land during the save"
    committed = {name: (ckpt / name / "trainrun.json").exists() for name in _checkpoints(ckpt)}
    assert committed and all(committed.values()), committed
    before = _checkpoints(ckpt)
    offset = log_size(run_dir)
    assert run_to_end(args, run_dir, nproc) == 0
    resumed_log = log_since(run_dir, offset)
    newest_before = max(int(n.removeprefix("step_")) for n in before)
    assert f"(step {newest_before}" in resumed_log, resumed_log[-2000:]  # resumed from the newest committed step
    reference = request.getfixturevalue("two_process_reference") if nproc == 2 else reference_losses
    assert losses(run_dir) == reference
    assert len(_checkpoints(ckpt)) <= KEEP_LAST + 1  # retention held (plus the resumed-from one)
    assert not list(ckpt.glob(".tmp_step_*")) and not list(ckpt.glob(".old_step_*"))


def test_signal_during_a_save_makes_it_the_exit_save(tmp_path, corpus_cache, reference_losses):
    """SIGTERM while step N is being saved: exit after that save, no second save of step N+1."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = base_args(corpus_cache, run_dir, "checkpoint.interval=2")
    proc = launch(args, run_dir)
    tmp = _strike_during_save(proc, ckpt, "write", lambda: proc.send_signal(signal.SIGTERM), skip_saves=1)
    saving = int(tmp.name.removeprefix(".tmp_step_"))
    assert proc.wait(timeout=120) == 3, output(proc)[-3000:]
    log = (run_dir / "train.log").read_text()
    received_at = log.index("received SIGTERM")
    assert log.rfind(f"checkpoint {ckpt / f'step_{saving}'}") > received_at  # it landed during that save
    assert f"stopping at step {saving} (signal)" in log
    assert f"signal requested during the save of step {saving}: that checkpoint is the exit save" in log
    assert _checkpoints(ckpt)[-1] == f"step_{saving}" and not (ckpt / f"step_{saving + 1}").exists()
    assert log.count("saved persistent checkpoint") == saving // 2  # one save per interval, none extra
    assert run_to_end(args, run_dir) == 0
    assert losses(run_dir) == reference_losses


def _limit_file_size() -> None:
    """Child setup: files may grow to 256 KiB (a checkpoint shard of the tiny model is larger); EFBIG
    instead of the default SIGXFSZ kill, as on a quota-limited filesystem. Needs no root."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_saves_that_keep_failing_stop_the_run(tmp_path, corpus_cache, reference_losses):
    """Runs without root (RLIMIT_FSIZE), unlike the tmpfs variant in test_bad_steps_and_disk.py.
    (``reference_losses`` builds the corpus cache first, outside the file size limit.)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = base_args(corpus_cache, run_dir, "checkpoint.interval=2", "checkpoint.max_failed_saves=3")
    done = subprocess.run([sys.executable, "-m", "trainrun", *args], cwd=run_dir, env=fault_env(), timeout=240,
                          capture_output=True, text=True, preexec_fn=_limit_file_size, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "file size limit (ulimit -f) 256 KiB" in done.stderr  # DCP's own words are cryptic; the cause is named
    assert "3 checkpoint saves in a row failed" in done.stderr
    assert "checkpoint.max_failed_saves=3" in done.stderr
    log = (run_dir / "train.log").read_text()
    assert log.count("training continues (previous checkpoints intact") == 2  # two reported, the third stops
    assert max(losses(run_dir)) == 6 < MAX_STEPS  # stopped at the third failed save, not days later
    ckpt = run_dir / "checkpoints"
    assert not list(ckpt.glob(".tmp_step_*")) and _checkpoints(ckpt) == []
