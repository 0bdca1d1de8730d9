"""Checkpoint directory layout and atomic commits with torch.distributed.checkpoint (DCP).

Layout under the checkpoint dir::

    step_<N>/            a complete checkpoint: DCP shards + .metadata + trainrun.json
    .tmp_step_<N>/       being written; never read
    latest               text file naming the newest complete checkpoint, replaced last

Tensors (model, optimizer, RNG states) go through DCP; everything else (train state, data
position, LR schedule, config) is JSON in ``trainrun.json``, so resuming unpickles nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.distributed.checkpoint as dcp

logger = logging.getLogger(__name__)

META_FILE = "trainrun.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file, fsync it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    """A checkpoint is complete when DCP's metadata and trainrun's JSON are both present."""
    return (path / ".metadata").is_file() and (path / META_FILE).is_file()


class CheckpointStore:
    """Saves, lists, prunes and loads checkpoints in one directory."""

    def __init__(self, directory: Path, keep_last: int, is_rank0: bool, barrier: Callable[[], None]):
        self.directory = directory
        self.keep_last = keep_last
        self.is_rank0 = is_rank0
        self.barrier = barrier

    def step_dir(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.directory / f"step_{step}"

    def save(self, step: int, tensors: dict, meta: dict) -> Path:
        """Write a checkpoint under a temp name, fsync, rename, then point ``latest`` at it."""
        final, tmp = self.step_dir(step), self.directory / f".tmp_step_{step}"
        if self.is_rank0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        with warnings.catch_warnings():
            # Without a process group DCP warns that it saves from one process: that is intended.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, checkpoint_id=str(tmp))
        if self.is_rank0:
            write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. final save after an interval save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            write_text_atomic(self.directory / LATEST_FILE, final.name + "\n")
            self._prune(protect=final)
        self.barrier()
        return final

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found) if is_complete(p)]

    def find_latest(self) -> Path | None:
        """The checkpoint ``latest`` names if complete, else the newest complete one (with a warning)."""
        latest_file = self.directory / LATEST_FILE
        if latest_file.is_file():
            named = self.directory / latest_file.read_text().strip()
            if is_complete(named):
                return named
            logger.warning("checkpoint %s named by %s is incomplete; looking for an older one", named, latest_file)
        candidates = self.complete_checkpoints()
        if candidates and latest_file.exists():
            logger.warning("falling back to %s", candidates[-1])
        return candidates[-1] if candidates else None

    def _prune(self, protect: Path) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_checkpoints()[: -self.keep_last]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_meta(path: Path) -> dict:
        """trainrun's JSON metadata of the checkpoint at ``path``."""
        return json.loads((path / META_FILE).read_text())

    @staticmethod
    def load_tensors(path: Path, tensors: dict) -> None:
        """Load DCP tensors in place into ``tensors`` (resharding as needed)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, checkpoint_id=str(path))
