"""Sweep point identity, the run-directory lock and the status file (no Slurm needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainrun.errors import RunEnvironmentError
from trainrun.launch.point import point_id
from trainrun.launch.run_status import RunDirLock, is_finished, read_status, record_status


def test_point_id_is_stable_short_and_distinct():
    assert point_id("model.n_layers=2,optim.lr=0.001") == point_id("model.n_layers=2,optim.lr=0.001")
    assert point_id("model.n_layers=2") != point_id("model.n_layers=3")
    assert len(point_id("")) == 11 and point_id("").startswith("p")
    cfg = OmegaConf.create({"d": "x", "sub": "${trainrun_point_id:${d}}"})  # registered by `import trainrun`
    assert cfg.sub == point_id("x")


def test_status_records_every_attempt(tmp_path: Path):
    assert read_status(tmp_path) == {} and not is_finished(tmp_path)
    record_status(tmp_path, "resume", 3)
    status = record_status(tmp_path, "finished", 0)
    assert [a["status"] for a in status["attempts"]] == ["resume", "finished"] and status["requeues"] == 1
    assert is_finished(tmp_path) and read_status(tmp_path) == status


_HOLDER = """
import sys, time
from pathlib import Path
from trainrun.launch.run_status import RunDirLock
with RunDirLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow  # the holder is another process
def test_a_run_directory_is_locked_while_a_run_writes_to_it(tmp_path: Path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunEnvironmentError, match=r"is in use by run \d+ on .*use another directory"), \
                RunDirLock(tmp_path):
            pass
    finally:
        holder.communicate("release\n", timeout=30)
    with RunDirLock(tmp_path):  # released with its holder: no stale lock
        pass
    killed = _hold_lock(tmp_path)
    killed.kill()
    killed.wait(30)
    with RunDirLock(tmp_path):  # a killed holder leaves no stale lock either
        pass


def test_wandb_group_of_a_sweep_point_is_the_sweep(tmp_path: Path):
    from trainrun.observe.wandb_sink import sweep_group

    point = tmp_path / "sweep-7" / "p0123456789"
    point.mkdir(parents=True)
    assert sweep_group(point) is None  # a single run
    (tmp_path / "sweep-7" / "multirun.yaml").write_text("{}")
    assert sweep_group(point) == "sweep-7"
