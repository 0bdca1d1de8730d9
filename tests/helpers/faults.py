"""Helpers for fault-injection tests: start real trainrun processes, poll their progress, hurt them.

Every test compares per-step training losses with an uninterrupted reference run of the same
config (JSON floats round-trip exactly, so equality is bit-exact). Rows of steps re-run after a
resume appear twice in metrics.jsonl; the last row per step wins.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.helpers.cli import TINY, cli_env

MAX_STEPS = 20
"""Every single-process fault run trains this many steps (the LR schedule depends on it)."""

INTERVAL = 2
"""checkpoint.interval of the fault runs: frequent saves, so random kills often land in one."""


def fault_env() -> dict[str, str]:
    return cli_env(OMP_NUM_THREADS="1")


def base_args(corpus: Path, run_dir: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    return [*TINY, f"data.path={corpus}", f"train.max_steps={max_steps}", "train.log_interval=1",
            "eval.interval=0", "eval.sample_tokens=0", "checkpoint.keep_last=0",
            f"hydra.run.dir={run_dir}", *extra]


def launch(args: list[str], run_dir: Path, nproc: int = 1) -> subprocess.Popen:
    """Start ``python -m trainrun`` (or torchrun with ``nproc`` workers); output goes to run_dir/proc-*.out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(run_dir.glob("proc-*.out")))
    out = open(run_dir / f"proc-{n}.out", "w")  # noqa: SIM115 - closed by the child's exit
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainrun", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000), "-m", "trainrun", *args]
    proc = subprocess.Popen(cmd, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, env=fault_env())
    out.close()
    proc.output_file = run_dir / f"proc-{n}.out"  # type: ignore[attr-defined]
    return proc


def run_to_end(args: list[str], run_dir: Path, nproc: int = 1, timeout: float = 240) -> int:
    proc = launch(args, run_dir, nproc)
    return proc.wait(timeout=timeout)


def output(proc: subprocess.Popen) -> str:
    return proc.output_file.read_text()  # type: ignore[attr-defined]


def metric_rows(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl; a partial last row (a kill mid-write) is ignored."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last row per step."""
    return {row["step"]: row["loss"] for row in metric_rows(run_dir) if "loss" in row}


def last_step(run_dir: Path) -> int:
    steps = [row["step"] for row in metric_rows(run_dir) if "loss" in row]
    return max(steps, default=0)


def wait_for_rows(run_dir: Path, more_than: int, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until metrics.jsonl has more than ``more_than`` loss rows; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len([r for r in metric_rows(run_dir) if "loss" in r]) > more_than:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"no progress in {run_dir} after {timeout}s:\n{output(proc)[-3000:]}")


def count_loss_rows(run_dir: Path) -> int:
    return len([r for r in metric_rows(run_dir) if "loss" in r])


_RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)")


def log_since(run_dir: Path, offset: int) -> str:
    path = run_dir / "train.log"
    return path.read_bytes()[offset:].decode(errors="replace") if path.is_file() else ""


def log_size(run_dir: Path) -> int:
    path = run_dir / "train.log"
    return path.stat().st_size if path.is_file() else 0


def resumed_step(log_text: str) -> int | None:
    """The step a launch resumed from, from its part of train.log (None: it started fresh)."""
    found = _RESUMED.findall(log_text)
    return int(found[-1][1]) if found else None


def latest_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    try:
        return int(latest.read_text().strip().removeprefix("step_"))
    except (OSError, ValueError):
        return None


def worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (read from /proc)."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


@contextmanager
def frozen(proc: subprocess.Popen) -> Iterator[list[int]]:
    """Hold the launcher and its workers still (SIGSTOP) inside the block, then let them go (SIGCONT).

    Tests that must strike inside a short phase (a save of a tiny model takes milliseconds) freeze the
    processes, check the phase again while nothing runs, and only then strike: the strike cannot miss.
    """
    pids = [proc.pid]
    with suppress(OSError):  # the launcher is gone: nothing more to freeze
        pids += list(worker_pids(proc).values())
    for pid in pids:
        _signal_if_alive(pid, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for pid in pids:
            _signal_if_alive(pid, signal.SIGCONT)


def _signal_if_alive(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def signal_again_during_exit_save(proc: subprocess.Popen, ckpt: Path, pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` again while the exit save's temporary directory exists; False if the save was missed."""
    deadline = time.monotonic() + 60
    while not (tmp := next(ckpt.glob(".tmp_step_*"), None)) and time.monotonic() < deadline:
        time.sleep(0.0005)
    assert tmp is not None, "the exit save never started"
    with frozen(proc):  # nothing runs between the check and the signal
        if not tmp.exists():
            return False
        os.kill(pid, sig)
        return True
