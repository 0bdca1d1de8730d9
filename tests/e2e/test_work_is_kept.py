"""Nothing a user does with the CLI destroys work it did not create (issue 15, findings 2-4).

Each test runs ``python -m trainrun`` as a user would, makes the mistake, and checks that the
earlier run's checkpoints and record are still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, cli_env, run_cli, train_losses

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={corpus}", "train.max_steps=4", "train.log_interval=1", "eval.interval=0",
            "eval.sample_tokens=0", "checkpoint.interval=2", f"hydra.run.dir={run_dir}", *extra]


def _digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``directory`` (lock files aside)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".trainrun.lock"}


def _one_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trainrun:")]  # log lines aside
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_changed_learned_position_table_is_refused_not_retrained(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    first = run_cli(_args(corpus_cache, run_dir, "model.position=learned", "model.max_seq_len=64"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before, losses = _digest(run_dir / "checkpoints"), train_losses(run_dir)
    again = run_cli(_args(corpus_cache, run_dir, "model.position=learned", "model.max_seq_len=128",
                          "train.max_steps=8"), tmp_path)
    _one_line(again, "model.max_seq_len", "has model.max_seq_len=64")
    assert _digest(run_dir / "checkpoints") == before and train_losses(run_dir) == losses
    assert "model:" not in again.stderr  # refused before the model was built


def test_resume_never_does_not_prune_an_earlier_runs_checkpoints(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    assert run_cli(_args(corpus_cache, run_dir, "checkpoint.keep_last=1"), tmp_path).returncode == 0
    before = _digest(run_dir / "checkpoints")
    again = run_cli(_args(corpus_cache, run_dir, "checkpoint.keep_last=1", "checkpoint.resume=never"), tmp_path)
    _one_line(again, "checkpoint.resume", "already holds 1 checkpoint")
    assert _digest(run_dir / "checkpoints") == before


def _start_long_run(args: list[str], cwd: Path, run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "trainrun", *args, "train.max_steps=100000"], cwd=cwd,
                            env=cli_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file():  # it holds the locks and has written its record
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    return proc


def test_a_second_run_writes_nothing_into_directories_a_live_run_holds(tmp_path, corpus_cache):
    live_dir, shared_ckpt = tmp_path / "live", tmp_path / "shared_ckpt"
    live = _start_long_run(_args(corpus_cache, live_dir, f"checkpoint.dir={shared_ckpt}"), tmp_path, live_dir)
    try:
        record = _digest(live_dir / ".hydra")
        same_dir = run_cli(_args(corpus_cache, live_dir, "optim.lr=0.5"), tmp_path)
        _one_line(same_dir, "hydra.run.dir", "is in use by run")
        assert _digest(live_dir / ".hydra") == record  # the live run's record of what runs is untouched
        other_dir = tmp_path / "other"
        same_ckpt = run_cli(_args(corpus_cache, other_dir, f"checkpoint.dir={shared_ckpt}"), tmp_path)
        _one_line(same_ckpt, "checkpoint.dir", "is in use by run")
        assert not (other_dir / "metrics.jsonl").exists() and not (other_dir / ".hydra").exists()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
