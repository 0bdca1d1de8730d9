"""Fixtures and hooks of the whole suite; the code tests share is in tests/helpers/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """A small bundled-corpus cache shared by the tests (400 stdlib files)."""
    return tmp_path_factory.mktemp("corpus")


SLOW_DIRS = ("distributed", "faults", "slurm", "e2e")
"""Test folders whose every test starts processes (real ranks, a cluster, the CLI): all marked slow."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection when a test of :data:`SLOW_DIRS` lacks the slow marker: ``-m "not slow"`` must stay fast."""
    tests = Path(__file__).resolve().parent
    unmarked = [item.nodeid for item in items
                if item.path.resolve().is_relative_to(tests) and item.path.resolve().relative_to(tests).parts[0]
                in SLOW_DIRS and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(
            f"tests under tests/{{{','.join(SLOW_DIRS)}}} start processes and must be marked slow "
            f"(pytestmark = [..., pytest.mark.slow]); unmarked: {', '.join(unmarked[:5])}"
            + (f" and {len(unmarked) - 5} more" if len(unmarked) > 5 else ""))


SLOW_PROGRAMS = {"pip", "pip3", "ruff", "torchrun", "bash", "sh", "sbatch", "srun", "salloc", "scontrol", "sinfo"}
"""Programs whose start makes a test slow, besides python* and trainrun* (a library's own helper processes, such
as wandb's ``git``, are let be)."""


@pytest.fixture(autouse=True)
def _fast_tests_start_no_program(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of the fast path (not marked slow) that starts Python, pip, ruff, a shell or a Slurm command fails,
    naming itself and the program: such a test takes seconds, so it is marked slow."""
    if request.node.get_closest_marker("slow") is not None:
        return
    execute = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def checked(self: subprocess.Popen, args, *rest, **kwargs):  # Popen's private signature
        program = Path(str(args if isinstance(args, (str, bytes, os.PathLike)) else args[0]).split()[0]).name
        if program.startswith(("python", "trainrun")) or program in SLOW_PROGRAMS:
            pytest.fail(f"{request.node.nodeid} starts {program} ({str(args)[:100]}): mark the test "
                        "@pytest.mark.slow, or test the function in-process", pytrace=False)
        return execute(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", checked)
