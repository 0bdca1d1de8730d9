"""A real one-node Slurm cluster for the tests (launchers/local_slurm/start.sh) (its helpers: tests/helpers/slurm.py).

The cluster is started once per session, reused if one is already up with the same scratch
directory, and stopped at the end only if this session started it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import cli_env
from tests.helpers.slurm import SCRATCH, START, STOP, cluster_up, missing_slurm_programs, squeue


@pytest.fixture(scope="session", autouse=True)
def _needs_slurm() -> None:
    """Skip, saying why, where Slurm is not installed (a developer's machine); CI installs it and runs these."""
    missing = missing_slurm_programs()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): apt-get install slurmctld slurmd "
                    "slurm-client munge, as .ci/run does")


@pytest.fixture(scope="session")
def slurm_env() -> Iterator[dict[str, str]]:
    """Environment (SLURM_CONF set) of a running one-node cluster."""
    env = cli_env(SLURM_CONF=str(SCRATCH / "slurm.conf"), TRAINRUN_SLURM_DIR=str(SCRATCH))
    started = False
    if not (Path(env["SLURM_CONF"]).is_file() and cluster_up(env)):
        proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        started = True
    for _ in range(100):
        if cluster_up(env):
            break
        time.sleep(0.2)
    yield env
    if started:
        subprocess.run(["bash", str(STOP)], env=env, check=False, timeout=60)


@pytest.fixture(autouse=True)
def _empty_queue_after_each_test(request) -> Iterator[None]:
    """A test that fails mid-way must not leave jobs that the next test would find in squeue."""
    yield
    if "slurm_env" in request.fixturenames:
        env = request.getfixturevalue("slurm_env")
        for job, _, _ in squeue(env):
            subprocess.run(["scancel", job], env=env, check=False, capture_output=True)
