"""SIGTERM / SIGUSR1 mid-run on one and on two processes: save the current step, exit 3, resume exactly.

Two processes run under ``python -m torch.distributed.run`` (DDP over gloo). Two ways of signalling:

* SIGTERM to torchrun itself, as a scheduler would: torchrun forwards SIGTERM to every worker
  ("Sending process ... closing signal SIGTERM") and waits for them; each worker saves and exits 3,
  but torchrun itself exits 1 (it raises SignalException). A requeue script should look at
  ``checkpoints/latest`` / train.log, not torchrun's exit code.
* SIGUSR1 to the rank-1 worker only: the exit decision is a MAX all-reduce, so rank 0 stops at the
  same step although it received nothing; both workers exit 3 and torchrun reports ``exitcode: 3``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tests.helpers.cli import start_ranks
from tests.helpers.faults import (
    MAX_STEPS,
    base_args,
    count_loss_rows,
    last_step,
    latest_step,
    launch,
    log_since,
    log_size,
    losses,
    output,
    run_to_end,
    signal_again_during_exit_save,
    wait_for_rows,
    worker_pids,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

_STOP = re.compile(r"stopping at step (\d+) \((\w+)\); exit code 3")


def _signal_mid_run(args: list[str], run_dir: Path, sig: signal.Signals, nproc: int = 1, target: str = "main",
                    twice: bool = False):
    """Launch, wait until this launch logged a step, signal it; return (process, exit code, stop step).

    ``twice``: a second signal while the exit save is being written; it must not interrupt that save.
    The processes are frozen before the second signal and the save is checked to be still under way; a
    save of the tiny model can end before the freeze on a loaded machine, and then the launch is resumed
    and signalled again (up to three times) rather than letting a second signal land after the save.
    """
    for _attempt in range(3):
        rows, offset = count_loss_rows(run_dir), log_size(run_dir)
        proc = launch(args, run_dir, nproc)
        assert wait_for_rows(run_dir, rows + 1, proc), output(proc)[-3000:]
        pid = proc.pid if target == "main" else worker_pids(proc)[int(target)]
        os.kill(pid, sig)
        if not twice or signal_again_during_exit_save(proc, run_dir / "checkpoints", pid, sig):
            break
        assert proc.wait(timeout=120) == 3, output(proc)[-3000:]
    else:
        raise AssertionError("three exit saves ended before the process could be frozen inside them")
    code = proc.wait(timeout=120)
    found = _STOP.findall(log_since(run_dir, offset))
    assert found, f"no 'stopping at step' in train.log:\n{output(proc)[-3000:]}"
    step, reason = int(found[-1][0]), found[-1][1]
    assert reason == "signal"
    assert step < MAX_STEPS, "the run finished before the signal arrived; the test machine is too fast"
    assert latest_step(run_dir / "checkpoints") == step  # the checkpoint of the current step was saved
    assert last_step(run_dir) == step
    return proc, code, step


def test_sigterm_and_sigusr1_single_process(tmp_path, corpus_cache, reference_losses):
    run_dir = tmp_path / "run"
    args = base_args(corpus_cache, run_dir, "checkpoint.interval=0")
    proc, code, first = _signal_mid_run(args, run_dir, signal.SIGTERM, twice=True)
    assert code == 3, output(proc)[-3000:]
    assert "received SIGTERM" in (run_dir / "train.log").read_text()
    proc, code, second = _signal_mid_run(args, run_dir, signal.SIGUSR1)
    assert code == 3 and second > first
    assert f"(step {first}" in (run_dir / "train.log").read_text()
    assert run_to_end(args, run_dir) == 0
    assert losses(run_dir) == reference_losses


@pytest.mark.distributed
def test_sigterm_and_sigusr1_two_processes(tmp_path, corpus_cache):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    two = ["parallel.dp_replicate=2"]
    assert run_to_end(base_args(corpus_cache, reference_dir, *two, "checkpoint.interval=0"),
                      reference_dir, nproc=2) == 0
    reference = losses(reference_dir)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))

    args = base_args(corpus_cache, run_dir, *two, "checkpoint.interval=0")
    # 1) SIGTERM to torchrun: it forwards SIGTERM to both workers, which save and exit 3.
    proc, code, first = _signal_mid_run(args, run_dir, signal.SIGTERM, nproc=2, target="main")
    out = output(proc)
    assert "closing signal SIGTERM" in out and code == 1  # torchrun's own code under a signal
    assert out.count("exit code 3 asks to be resumed") >= 1  # rank 0's log line (rank 1 logs to its stderr only)
    # 2) SIGUSR1 to rank 1 only: rank 0 agrees through the all-reduce and stops at the same step.
    proc, code, second = _signal_mid_run(args, run_dir, signal.SIGUSR1, nproc=2, target="1")
    out = output(proc)
    assert second > first
    assert code == 1 and re.search(r"exitcode\s*:\s*3", out), out[-3000:]
    assert "received SIGUSR1" not in log_since(run_dir, 0).split("resumed from")[-1]  # rank 0 got no signal
    # 3) the same without torchrun in between, to see each rank's own exit code: both 3.
    codes, third = _signal_rank1_without_torchrun(args, run_dir)
    assert codes == [3, 3] and third > second
    # 4) finish, identical to the uninterrupted two-process run.
    assert run_to_end(args, run_dir, nproc=2) == 0
    assert losses(run_dir) == reference


def _signal_rank1_without_torchrun(args: list[str], run_dir: Path) -> tuple[list[int], int]:
    """Start two ranks with torchrun's environment variables, SIGUSR1 rank 1; return (exit codes, stop step)."""
    rows, offset = count_loss_rows(run_dir), log_size(run_dir)
    procs = start_ranks(2, args, run_dir, 29500 + (os.getpid() + 7) % 1000)
    try:
        assert wait_for_rows(run_dir, rows + 1, procs[0])
        procs[1].send_signal(signal.SIGUSR1)
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    found = _STOP.findall(log_since(run_dir, offset))
    assert found, procs[1].stderr.read()[-3000:]
    return codes, int(found[-1][0])
