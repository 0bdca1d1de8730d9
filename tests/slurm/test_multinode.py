"""Two nodes for real: a Slurm cluster of two nodes in namespaces on this machine
(``launchers/local_slurm/start.sh --nodes 2``), trainrun across them through hydra-submitit-launcher
and ``launchers/torchrun.sbatch`` with the losses of one process, and preemption of a 2-node job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, TINY, cli_env, read_metrics, run_cli, train_losses
from tests.helpers.slurm import START, STOP, RequeueReleaser, node_pids, squeue, start_sweep, sweep

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

QUIET = [*TINY, "eval.sample_tokens=0", "train.log_interval=1"]
TWO_NODES = ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"]
TORCHRUN_SBATCH = REPO / "launchers" / "torchrun.sbatch"


def _points(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith("p"))


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc.stdout


def _reference(args: list[str], tmp_path: Path, env: dict[str, str]) -> dict[int, float]:
    run_dir = tmp_path / "reference"
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


def _assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


def _rank_hosts(run_dir: Path) -> str:
    """The start-up line naming the host of every rank."""
    return next(line for line in (run_dir / "train.log").read_text().splitlines() if "hosts:" in line)


# ---- the cluster --------------------------------------------------------------------------------------
def test_two_nodes_have_their_own_hostname_address_and_local_disk(slurm2_env):
    env = slurm2_env
    assert "n[1-2]" in _run(["sinfo", "-h", "-o", "%N %D %T"], env)
    assert sorted(_run(["srun", "-N2", "hostname"], env).split()) == ["n1", "n2"]
    scratch = Path(env["TRAINRUN_SLURM_DIR"])
    marker = f"written-by-{os.getpid()}"
    # Each node writes into the same node-local path and sees only its own file there; the rest of
    # the filesystem (the scratch dir) is shared.
    out = _run(["srun", "-N2", "sh", "-c", f"hostname > {scratch}/local/{marker}; sleep 1; "
                f"echo $(hostname) $(cat {scratch}/local/{marker}) $(ip -4 -o addr show eth0 | awk '{{print $4}}')"],
               env)
    lines = sorted(out.splitlines())
    assert [line.split()[:2] for line in lines] == [["n1", "n1"], ["n2", "n2"]]
    assert lines[0].split()[2] != lines[1].split()[2]  # two addresses
    for node in ("n1", "n2"):
        assert (scratch / "nodes" / node / "local" / marker).read_text().strip() == node
        (scratch / "nodes" / node / "local" / marker).unlink()
    assert not (scratch / "local" / marker).exists()  # the host's own view of the path is untouched


def test_stop_removes_exactly_what_start_made(tmp_path):
    """A third cluster of its own (scratch, ports, names, subnet): up in under 30 s with 2 idle nodes,
    then stop.sh leaves the machine's namespaces and links as they were, a namespace it did not make included."""
    scratch = tmp_path / "c"
    env = cli_env(TRAINRUN_SLURM_DIR=str(scratch), TRAINRUN_SLURMCTLD_PORT="16847", TRAINRUN_SLURM_PREFIX="trtst",
                  TRAINRUN_SLURM_SUBNET="10.78.0", SLURM_CONF=str(scratch / "slurm.conf"))

    def machine() -> tuple[str, str]:
        links = _run(["ip", "-o", "link", "show"], env)
        return _run(["ip", "netns", "list"], env), "\n".join(sorted(line.split(":")[1] for line in links.splitlines()))

    _run(["ip", "netns", "add", "trtst-n2"], env)  # somebody else's namespace, with a name start.sh would use
    try:
        before = machine()
        refused = subprocess.run(["bash", str(START), "--nodes", "2"], env=env, capture_output=True, text=True)
        assert refused.returncode == 2 and "trtst-n2 already exists and was not made by this cluster" in refused.stderr
        assert machine() == before and not (tmp_path / "c" / "slurmctld.pid").exists()
        _run(["ip", "netns", "del", "trtst-n2"], env)
        _run(["ip", "netns", "add", "trtst-n9"], env)  # one it would not use: left alone
        before = machine()
        started = time.monotonic()
        _run(["bash", str(START), "--nodes", "2"], env)
        assert time.monotonic() - started < 30
        assert _run(["sinfo", "-h", "-N", "-o", "%N %T"], env).split() == ["n1", "idle", "n2", "idle"]
        assert "trtst-n1" in _run(["ip", "netns", "list"], env)
        again = subprocess.run(["bash", str(START), "--nodes", "3"], env=env, capture_output=True, text=True)
        assert again.returncode == 2 and "another node count" in again.stderr
        _run(["bash", str(STOP)], env)
        assert machine() == before
        assert "trtst-n9" in _run(["ip", "netns", "list"], env)
    finally:
        subprocess.run(["bash", str(STOP)], env=env, check=False, capture_output=True)
        for name in ("trtst-n2", "trtst-n9"):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


# ---- training across two nodes -------------------------------------------------------------------------
LAYOUTS = {
    "ddp": (["parallel.dp_replicate=2"], 1),
    "fsdp2": (["parallel.dp_shard=2"], 1),
    # HSDP: replicas across the nodes, shards within each node (2 tasks per node, 4 processes); the same
    # global batch of 8 in micro-batches of 2 (the reference accumulates 4 of them).
    "hsdp": (["parallel.dp_replicate=2", "parallel.dp_shard=2"], 2),
}
MICRO_BATCH = {"hsdp": ["train.micro_batch_size=2"]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_submitit_two_node_job_trains_like_one_process(slurm2_env, corpus_cache, tmp_path, layout):
    degrees, tasks_per_node = LAYOUTS[layout]
    common = [*QUIET, *MICRO_BATCH.get(layout, []), f"data.path={corpus_cache}", "train.max_steps=6"]
    expected = _reference(common, tmp_path, slurm2_env)
    sweep_dir = tmp_path / "sweep"
    proc = sweep([*common, *degrees, "hydra.launcher.nodes=2", f"hydra.launcher.tasks_per_node={tasks_per_node}",
                  f"hydra.sweep.dir={sweep_dir}"], slurm2_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = _points(sweep_dir)
    log = (run_dir / "train.log").read_text()
    assert f"initializer=slurm world_size={2 * tasks_per_node}" in log
    hosts = _rank_hosts(run_dir)
    assert "n1" in hosts and "n2" in hosts, hosts
    _assert_same_losses(train_losses(run_dir), expected)


def _sbatch_torchrun(args: list[str], env: dict[str, str], cwd: Path, run_dir: Path, wait: bool = True) -> str:
    """``sbatch --nodes=2 launchers/torchrun.sbatch <args>`` on a CPU cluster; returns the job id."""
    job_env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "GPUS_PER_NODE": "1",
               "OMP_NUM_THREADS": "1", "RUN_DIR": str(run_dir)}
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--job-name=trainrun",
           *(["--wait"] if wait else []), str(TORCHRUN_SBATCH), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=job_env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + _job_output(cwd)[-3000:]
    return proc.stdout.strip().split(";")[0]


def _job_output(cwd: Path) -> str:
    return "".join(p.read_text() for p in cwd.glob("trainrun-*.out"))


def test_torchrun_sbatch_on_two_nodes_trains_like_one_process(slurm2_env, corpus_cache, tmp_path):
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=6"]
    expected = _reference(common, tmp_path, slurm2_env)
    run_dir = tmp_path / "torchrun"
    _sbatch_torchrun([*common, "parallel.dp_shard=2"], slurm2_env, tmp_path, run_dir)
    log = (run_dir / "train.log").read_text()
    assert "initializer=torchrun world_size=2" in log
    hosts = _rank_hosts(run_dir)
    assert "n1" in hosts and "n2" in hosts, hosts
    _assert_same_losses(train_losses(run_dir), expected)


# ---- preemption ---------------------------------------------------------------------------------------
def _wait_for(predicate, what: str, timeout: float = 180, alive: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None:
            assert alive.poll() is None, alive.communicate()[0][-3000:]
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _reached_step(run_dir: Path, step: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and any(r.get("step", 0) >= step for r in read_metrics(run_dir) if "loss" in r)


def _attempts(run_dir: Path) -> list[str]:
    return [a["status"] for a in json.loads((run_dir / "trainrun_status.json").read_text())["attempts"]]


@pytest.mark.parametrize("interruption", ["usr2", "scontrol_requeue"])
def test_preempted_two_node_job_saves_requeues_and_finishes_like_an_uninterrupted_run(
        slurm2_env, corpus_cache, tmp_path, interruption):
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=200", "checkpoint.interval=0"]
    expected = _reference(common, tmp_path, slurm2_env)
    sweep_dir = tmp_path / "sweep"
    with RequeueReleaser(slurm2_env) as releaser:
        launcher = start_sweep([*common, *TWO_NODES, "parallel.dp_replicate=2", f"hydra.sweep.dir={sweep_dir}"],
                               slurm2_env, tmp_path)
        run_dir = _wait_for(lambda: sweep_dir.is_dir() and _points(sweep_dir) and _points(sweep_dir)[0],
                            "the run directory", alive=launcher)
        _wait_for(lambda: _reached_step(run_dir, 20), "step 20", alive=launcher)
        [(job, state, _)] = squeue(slurm2_env)
        assert state == "RUNNING"
        if interruption == "usr2":
            _run(["scancel", "--signal=USR2", job], slurm2_env)
        else:
            _run(["scontrol", "requeue", job], slurm2_env)
        out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-4000:]
    assert _attempts(run_dir) == ["resume", "finished"]
    assert releaser.released >= 1
    log = (run_dir / "train.log").read_text()
    assert f"received {'SIGUSR2' if interruption == 'usr2' else 'SIGTERM'}" in log and "resumed from" in log
    assert train_losses(run_dir) == expected  # bit for bit on CPU, before and after the requeue


def test_torchrun_sbatch_job_signalled_by_slurm_saves_requeues_and_finishes(slurm2_env, corpus_cache, tmp_path):
    """What ``#SBATCH --signal=TERM@120`` delivers before the time limit: SIGTERM to the step's tasks (the
    torchrun agents), forwarded to the ranks, which save and exit 3; the script requeues the job."""
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=200", "checkpoint.interval=0"]
    expected = _reference(common, tmp_path, slurm2_env)
    run_dir = tmp_path / "torchrun"
    with RequeueReleaser(slurm2_env) as releaser:
        job = _sbatch_torchrun([*common, "parallel.dp_replicate=2"], slurm2_env, tmp_path, run_dir, wait=False)
        _wait_for(lambda: _reached_step(run_dir, 20), "step 20")
        _run(["scancel", f"--signal={signal.SIGTERM.name.removeprefix('SIG')}", job], slurm2_env)
        _wait_for(lambda: not squeue(slurm2_env), "the job to finish", timeout=400)
    output = _job_output(tmp_path)
    assert releaser.released >= 1, output[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "received SIGTERM" in log and "resumed from" in log, output[-3000:]
    assert train_losses(run_dir) == expected
    assert "trainrun asked to be resumed (status: resume" in output and "requeueing job" in output


# ---- a lost node, a hung rank ---------------------------------------------------------------------------
FAULT = [*QUIET, "train.max_steps=300", "checkpoint.interval=20", "parallel.heartbeat_interval_s=0.5",
         "parallel.hang_timeout_s=10", "parallel.collective_timeout_s=60"]
SUBMITIT_TASK = "submitit.core._submit"
"""The command line of a submitit job's task: the trainrun rank it runs."""


def _start_two_node_point(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    sweep_dir = tmp_path / "sweep"
    launcher = start_sweep([*args, *TWO_NODES, "parallel.dp_replicate=2", f"hydra.sweep.dir={sweep_dir}"], env,
                           tmp_path)
    run_dir = _wait_for(lambda: sweep_dir.is_dir() and _points(sweep_dir) and _points(sweep_dir)[0],
                        "the run directory", alive=launcher)
    _wait_for(lambda: _reached_step(run_dir, 50), "step 50", alive=launcher)
    return launcher, run_dir


def _committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "trainrun.json").is_file())


def _finish(launcher: subprocess.Popen, run_dir: Path, expected: dict[int, float], first: str) -> None:
    out, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, out[-4000:]
    assert _attempts(run_dir) == [first, "finished"], _attempts(run_dir)
    assert train_losses(run_dir) == expected  # the replayed steps too: nothing committed was lost


def test_a_node_whose_ranks_die_stops_the_survivors_and_the_requeued_job_resumes(slurm2_env, corpus_cache, tmp_path):
    """Every trainrun process on n2 is SIGKILLed (no save): the rank on n1 stops within seconds naming the
    lost rank and host, exits 5 and requeues the job, which resumes from the last committed checkpoint."""
    common = [*FAULT, f"data.path={corpus_cache}"]
    expected = _reference(common, tmp_path, slurm2_env)
    with RequeueReleaser(slurm2_env):
        launcher, run_dir = _start_two_node_point(common, slurm2_env, tmp_path)
        victims = node_pids("n2", match=SUBMITIT_TASK)
        assert victims
        committed = _committed_steps(run_dir)
        killed = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: "peer_lost" in _attempts_or_none(run_dir), "rank 0 to give up",
                  timeout=90, alive=launcher)
        gave_up_s = time.monotonic() - killed
        _finish(launcher, run_dir, expected, "peer_lost")
    log = (run_dir / "train.log").read_text()
    assert "peer lost: rank 1 (host n2)" in log and "exit code 5 (PEER_LOST)" in log
    resumed = int(log.split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert resumed >= max(committed)  # the newest committed checkpoint, or a later one
    assert gave_up_s < 60
    print(f"node loss: rank 0 gave up {gave_up_s:.1f}s after the kill")


def test_a_node_whose_slurmd_stops_is_failed_by_slurm_and_the_job_resumes_when_it_is_back(
        slurm2_env, corpus_cache, tmp_path):
    """n2's slurmd stops (its ranks go on): Slurm marks n2 down after SlurmdTimeout, ends the job and requeues
    it; it runs again once n2 is back and finishes with the losses of an uninterrupted run."""
    common = [*FAULT, f"data.path={corpus_cache}", "train.max_steps=2000", "checkpoint.interval=100"]
    expected = _reference(common, tmp_path, slurm2_env)
    scratch = Path(slurm2_env["TRAINRUN_SLURM_DIR"])
    with RequeueReleaser(slurm2_env):
        launcher, run_dir = _start_two_node_point(common, slurm2_env, tmp_path)
        slurmd = int((scratch / "slurmd.n2.pid").read_text())
        os.kill(slurmd, signal.SIGKILL)
        _wait_for(lambda: "down" in _run(["sinfo", "-h", "-n", "n2", "-o", "%T"], slurm2_env), "n2 to be down",
                  timeout=120, alive=launcher)
        _wait_for(lambda: len(_attempts_or_none(run_dir)) >= 1, "the first attempt to end", timeout=120,
                  alive=launcher)
        _run(["bash", str(START), "--nodes", "2"], slurm2_env)  # the node is back
        out, _ = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, out[-4000:]
    attempts = _attempts(run_dir)
    assert attempts[-1] == "finished" and len(attempts) >= 2, attempts
    assert train_losses(run_dir) == expected


def _attempts_or_none(run_dir: Path) -> list[str]:
    status = run_dir / "trainrun_status.json"
    return _attempts(run_dir) if status.is_file() else []


def test_a_hung_rank_is_found_by_the_watchdog_and_the_requeued_job_resumes(slurm2_env, corpus_cache, tmp_path):
    """The rank on n2 is SIGSTOPped: within parallel.hang_timeout_s the rank on n1 names it, writes its stacks,
    exits 6 and requeues the job, which resumes from the last committed checkpoint."""
    common = [*FAULT, f"data.path={corpus_cache}"]
    expected = _reference(common, tmp_path, slurm2_env)
    with RequeueReleaser(slurm2_env):
        launcher, run_dir = _start_two_node_point(common, slurm2_env, tmp_path)
        [victim] = node_pids("n2", match=SUBMITIT_TASK)
        stopped = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        try:
            _wait_for(lambda: "hung" in _attempts_or_none(run_dir), "the watchdog",
                      timeout=90, alive=launcher)
            found_s = time.monotonic() - stopped
        finally:
            with contextlib.suppress(ProcessLookupError):  # unless Slurm already ended it with the job
                os.kill(victim, signal.SIGKILL)
        _finish(launcher, run_dir, expected, "hung")
    log = (run_dir / "train.log").read_text()
    assert "hang detected: rank 1 (host n2)" in log and "exit code 6 (HUNG)" in log
    assert list((run_dir / "hang").glob("rank0-*.txt"))
    assert 9 <= found_s < 40  # hang_timeout_s=10 counts from the last heartbeat, up to 0.5 s before the stop
    print(f"hang: found {found_s:.1f}s after SIGSTOP")


def test_torchrun_sbatch_job_that_loses_a_node_requeues_and_resumes(slurm2_env, corpus_cache, tmp_path):
    """The trainrun rank on n2 is SIGKILLed (its torchrun agent survives): srun --kill-on-bad-exit ends the
    step, the script sees a killed rank and requeues, the job resumes from the last committed checkpoint."""
    common = [*FAULT, f"data.path={corpus_cache}"]
    expected = _reference(common, tmp_path, slurm2_env)
    run_dir = tmp_path / "torchrun"
    with RequeueReleaser(slurm2_env):
        _sbatch_torchrun([*common, "parallel.dp_replicate=2"], slurm2_env, tmp_path, run_dir, wait=False)
        _wait_for(lambda: _reached_step(run_dir, 50), "step 50")
        victims = node_pids("n2", match="-m trainrun")
        workers = [p for p in victims if "torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 1, victims
        os.kill(workers[0], signal.SIGKILL)
        _wait_for(lambda: not squeue(slurm2_env) and "finished" in _attempts_or_none(run_dir), "the job to finish",
                  timeout=400)
    output = _job_output(tmp_path)
    # srun --kill-on-bad-exit ends the surviving ranks at once (no attempt recorded); the script sees killed
    # ranks, requeues, and the job resumes from the last committed checkpoint.
    assert "trainrun asked to be resumed" in output and "requeueing job" in output, output[-3000:]
    assert _attempts(run_dir)[-1] == "finished"
    resumed = int((run_dir / "train.log").read_text().split("resumed from")[1].split("(step ")[1].split(")")[0])
    assert resumed >= 40
    assert train_losses(run_dir) == expected


# ---- node-local checkpoints ----------------------------------------------------------------------------
@pytest.fixture
def node_disks(slurm2_env, tmp_path) -> Iterator[dict[str, Path]]:
    """This test's folder on each node's local disk; removed afterwards (the disks outlive the test)."""
    scratch = Path(slurm2_env["TRAINRUN_SLURM_DIR"])
    name = f"{tmp_path.name}-{uuid.uuid4().hex[:8]}"  # the disks outlive every pytest tmp dir
    disks = {node: scratch / "nodes" / node / "local" / name for node in ("n1", "n2")}
    yield disks
    for disk in disks.values():
        shutil.rmtree(disk, ignore_errors=True)


@pytest.mark.parametrize("case", ["resume_local", "wiped_node", "wiped_node_with_replica"])
def test_node_local_checkpoints_on_two_nodes(slurm2_env, corpus_cache, tmp_path, node_disks, case):
    """Each node keeps its rank's node-local checkpoints on its own disk (``$SCRATCH/local``, a different
    folder on each node). After a crash (every rank SIGKILLed by Slurm, no save) the same sweep launched
    again resumes from the newest node-local step; with n2's disk wiped it falls back to the persistent
    checkpoint, unless n1 holds a replica of n2's files. Losses bit-exact with an uninterrupted run."""
    scratch = Path(slurm2_env["TRAINRUN_SLURM_DIR"])
    local = f"{scratch}/local/{node_disks['n1'].name}"  # the same path on both nodes, a different disk on each
    replicas = ["checkpoint.local_replicas=1"] if case == "wiped_node_with_replica" else []
    common = [*QUIET, f"data.path={corpus_cache}", "train.max_steps=200", "checkpoint.interval=50",
              "checkpoint.non_persistent_interval=10", *replicas]
    expected = _reference([*QUIET, f"data.path={corpus_cache}", "train.max_steps=200"], tmp_path, slurm2_env)
    sweep_dir = tmp_path / "sweep"
    args = [*common, *TWO_NODES, "parallel.dp_shard=2", f"checkpoint.non_persistent_dir={local}",
            f"hydra.sweep.dir={sweep_dir}"]
    launcher = start_sweep(args, slurm2_env, tmp_path)
    run_dir = _wait_for(lambda: sweep_dir.is_dir() and _points(sweep_dir) and _points(sweep_dir)[0],
                        "the run directory", alive=launcher)
    _wait_for(lambda: _reached_step(run_dir, 75), "step 75", alive=launcher)
    [(job, _, _)] = squeue(slurm2_env)
    # A crash of the whole job (power lost on both nodes): every rank SIGKILLed at once, no save; then the
    # job is cancelled for good and the sweep command dies too.
    ranks = node_pids("n1", match=SUBMITIT_TASK) + node_pids("n2", match=SUBMITIT_TASK)
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    launcher.kill()
    launcher.communicate(timeout=30)
    _run(["scancel", job], slurm2_env)
    _wait_for(lambda: not squeue(slurm2_env), "the job to be gone", timeout=90)
    # This run's folder on each node's disk (run-<hash of the run dir>: runs sharing the disk stay apart).
    disks = {node: next(disk.glob("run-*")) for node, disk in node_disks.items()}
    newest_local = max(int(p.name.removeprefix("local_step_")) for p in disks["n1"].glob("local_step_*"))
    committed_at_crash = max(_committed_steps(run_dir))
    assert newest_local > committed_at_crash >= 50
    if case == "wiped_node_with_replica":  # n1 holds a copy of n2's rank's file
        assert (disks["n1"] / f"local_step_{newest_local}" / "rank_1.pt").is_file()
    if case != "resume_local":
        shutil.rmtree(disks["n2"])  # the node was replaced: its disk is empty

    again = sweep(args, slurm2_env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    resumed = log.split("resumed from")[-1].split("\n")[0]
    if case == "wiped_node":
        assert "cannot be restored" in log and "n2" in log.split("cannot be restored")[1].split("\n")[0]
        assert f"checkpoints/step_{committed_at_crash} " in resumed, resumed
    else:
        assert f"local_step_{newest_local} " in resumed, resumed
    # Every step replayed after the resume has the loss it had before the crash, bit for bit, and every
    # step the loss of one process (to the tolerance of FSDP's other reduction order).
    by_step: dict[int, set[float]] = {}
    for row in read_metrics(run_dir):
        if "loss" in row:
            by_step.setdefault(row["step"], set()).add(row["loss"])
    assert all(len(losses) == 1 for losses in by_step.values()), {s: v for s, v in by_step.items() if len(v) > 1}
    _assert_same_losses(train_losses(run_dir), expected)
