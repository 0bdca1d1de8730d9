"""Real Slurm clusters for the tests (launchers/local_slurm/start.sh): one node, and two nodes in namespaces.

Each cluster is started once per session (helpers: tests/helpers/slurm.py), reused if one is already up
with the same scratch directory, and stopped at the end only if this session started it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers.cli import cli_env
from tests.helpers.slurm import (
    MULTINODE_CTLD_PORT,
    MULTINODE_PROGRAMS,
    MULTINODE_SCRATCH,
    SCRATCH,
    STOP,
    missing_slurm_programs,
    squeue,
    start_cluster,
)


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
    started = start_cluster(env)
    yield env
    if started:
        subprocess.run(["bash", str(STOP)], env=env, check=False, timeout=60)


@pytest.fixture(scope="session")
def slurm2_env() -> Iterator[dict[str, str]]:
    """Environment of a running two-node cluster (``start.sh --nodes 2``: nodes n1 and n2, each in its own
    network, UTS and mount namespaces); it runs beside the one-node cluster."""
    missing = [name for name in MULTINODE_PROGRAMS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"a multi-node cluster needs {', '.join(missing)} (apt-get install iproute2 util-linux)")
    env = cli_env(SLURM_CONF=str(MULTINODE_SCRATCH / "slurm.conf"), TRAINRUN_SLURM_DIR=str(MULTINODE_SCRATCH),
                  TRAINRUN_SLURMCTLD_PORT=MULTINODE_CTLD_PORT)
    started = start_cluster(env, nodes=2)
    yield env
    if started:
        subprocess.run(["bash", str(STOP)], env=env, check=False, timeout=60)


@pytest.fixture(autouse=True)
def _empty_queue_after_each_test(request) -> Iterator[None]:
    """A test that fails mid-way must not leave jobs that the next test would find in squeue."""
    yield
    for name in ("slurm_env", "slurm2_env"):
        if name in request.fixturenames:
            env = request.getfixturevalue(name)
            for job, _, _ in squeue(env):
                subprocess.run(["scancel", job], env=env, check=False, capture_output=True)
