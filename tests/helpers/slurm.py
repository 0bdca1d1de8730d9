"""Drive the real one-node Slurm cluster of the tests (launchers/local_slurm/start.sh): its programs, queue
and sweeps as a user types them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers.cli import REPO

START = REPO / "launchers" / "local_slurm" / "start.sh"
STOP = REPO / "launchers" / "local_slurm" / "stop.sh"
SCRATCH = Path(os.environ.get("TRAINRUN_SLURM_DIR", "/tmp/trainrun-slurm"))
"""The one-node cluster's scratch directory."""
MULTINODE_SCRATCH = Path(os.environ.get("TRAINRUN_SLURM_MULTINODE_DIR", "/tmp/trainrun-slurm-2n"))
"""The two-node cluster's (``start.sh --nodes 2``): its own slurmctld port, munged and namespaces."""
MULTINODE_CTLD_PORT = os.environ.get("TRAINRUN_SLURM_MULTINODE_PORT", "16827")
MULTINODE_PREFIX = os.environ.get("TRAINRUN_SLURM_PREFIX", "trainrun")
"""Names of its namespaces (``<prefix>-n1``); with TRAINRUN_SLURM_SUBNET, another cluster can run beside it."""
MULTINODE_PROGRAMS = ("ip", "nsenter", "unshare")
"""What ``start.sh --nodes N`` needs beyond Slurm: network namespaces and a bridge (iproute2, util-linux)."""

SLURM_PROGRAMS = ("slurmctld", "slurmd", "sinfo", "sbatch", "munged")
"""What launchers/local_slurm/start.sh runs; .ci/run installs them (Debian's slurmctld, slurmd, slurm-client, munge)."""


def missing_slurm_programs() -> list[str]:
    """The Slurm programs this machine lacks (looked up on PATH and in the sbin folders where Debian puts daemons)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in SLURM_PROGRAMS if shutil.which(name, path=path) is None]


def cluster_up(env: dict[str, str], nodes: int = 1) -> bool:
    """The cluster of ``env`` (its SLURM_CONF) answers and has ``nodes`` usable nodes."""
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
    usable = [s for s in proc.stdout.split() if s.rstrip("*") in ("idle", "mixed", "allocated")]
    return proc.returncode == 0 and len(usable) >= nodes


def start_cluster(env: dict[str, str], nodes: int = 1) -> bool:
    """Start the cluster of ``env`` (its TRAINRUN_SLURM_DIR) unless it is up; True when this call started it."""
    if Path(env["SLURM_CONF"]).is_file() and cluster_up(env, nodes):
        return False
    proc = subprocess.run(["bash", str(START), "--nodes", str(nodes)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deadline = time.monotonic() + 60
    while not cluster_up(env, nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster_up(env, nodes), subprocess.run(["sinfo", "-N"], env=env, capture_output=True, text=True).stdout
    return True


def node_pids(node: str, prefix: str = MULTINODE_PREFIX, match: str = "trainrun") -> list[int]:
    """Python processes running on ``node`` of a ``start.sh --nodes N`` cluster (in its network namespace) whose
    command line contains ``match``."""
    out = subprocess.run(["ip", "netns", "pids", f"{prefix}-{node}"], capture_output=True, text=True,
                         check=False).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        # A Python process itself, not srun or a shell whose arguments name one.
        if Path(argv[0]).name.startswith("python") and match in " ".join(argv):
            pids.append(pid)
    return pids


def squeue(env: dict[str, str]) -> list[tuple[str, str, str]]:
    """(job id, state, reason) of every job in the queue."""
    out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


class RequeueReleaser:
    """Makes requeued jobs eligible sooner (Slurm holds them about 2 minutes, Reason=BeginTime).

    A job released within a second or so of its requeue is killed by slurmd ("Job credential
    revoked": the previous instance is still being cleaned up), so each is released only after it
    has been held for ``hold_s`` seconds.
    """

    def __init__(self, env: dict[str, str], hold_s: float = 5.0):
        self.env, self.hold_s, self.released = env, hold_s, 0
        self._held_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for job, state, reason in squeue(self.env):
                if state != "PENDING" or reason != "BeginTime":
                    self._held_since.pop(job, None)
                    continue
                if now - self._held_since.setdefault(job, now) >= self.hold_s:
                    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=self.env,
                                   check=False, capture_output=True)
                    self._held_since.pop(job)
                    self.released += 1

    def __enter__(self) -> RequeueReleaser:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def sweep(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m trainrun -m hydra/launcher=submitit_slurm <args>`` as a user types it; waits for every job."""
    return subprocess.run([sys.executable, "-m", "trainrun", "-m", "hydra/launcher=submitit_slurm",
                           "hydra.launcher.cpus_per_task=1", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_sweep(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """The same, in the background."""
    return subprocess.Popen([sys.executable, "-m", "trainrun", "-m", "hydra/launcher=submitit_slurm",
                             "hydra.launcher.cpus_per_task=1", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
