"""The checkpoint directory: what it holds, how a checkpoint commits into it, and which one is newest.

Layout under a checkpoint dir::

    step_<N>/            a complete checkpoint: DCP shards + .metadata + trainrun.json + manifest.json
    .tmp_step_<N>/       being written; never read, removed on the next save
    .old_step_<N>/       the previous copy of step_<N> while a re-save of that step commits
    latest               text file naming the newest complete checkpoint, replaced last

A checkpoint is written under its temp name, its manifest (size and sha256 of every file) is
written, everything is fsync'ed, the directory is renamed, and only then is ``latest`` replaced
(write-temp-fsync-rename). A kill at any moment leaves either the old or the new checkpoint
complete: a re-save of an existing step moves the old copy to ``.old_step_<N>`` first, and
``recover()`` moves it back if the kill came before the new copy took its name.

Order is commit order, not step order: every commit records ``commit_seq``, one more than any
checkpoint in the directory. After a rollback (resuming an older step, a weights-only resume)
the new branch's checkpoints are the newest even with lower step numbers, so ``find_latest``
returns to the branch that was committed last and retention prunes the abandoned one first.

This module is plain files and JSON, one process at a time (rank 0 of a run): the tensors are
:mod:`trainrun.checkpoint.dcp_io`'s, agreeing across ranks is :mod:`trainrun.checkpoint.store`'s.
It imports no torch, so the output-directory rules (:mod:`trainrun.outputs`) can read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

META_FILE = "trainrun.json"
MANIFEST_FILE = "manifest.json"
"""Size (and sha256) of every other file of a checkpoint, trainrun.json included; written last."""
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.old_step_(\d+)$")


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file, fsync it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _file_digest(path: Path, with_hash: bool) -> dict:
    entry: dict = {"size": path.stat().st_size}
    if with_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        entry["sha256"] = digest.hexdigest()
    return entry


def build_manifest(directory: Path, verify: str) -> dict[str, dict]:
    """Size (and sha256 unless verify != sha256) of every file of ``directory`` but the manifest, fsync'ing each."""
    manifest = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())
        manifest[str(file.relative_to(directory))] = _file_digest(file, verify == "sha256")
    return manifest


def verify_checkpoint(path: Path, verify: str) -> str | None:
    """None if ``path`` is a complete checkpoint whose files match its manifest, else the reason."""
    if not (path / META_FILE).is_file():
        return f"{META_FILE} is missing"
    if not (path / ".metadata").is_file():
        return "DCP .metadata is missing"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        return f"{META_FILE} is unreadable ({err})"
    if verify == "none":
        return None
    del meta  # trainrun.json is one of the files the manifest covers, not where it comes from
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        return (f"{MANIFEST_FILE} is missing, so its files cannot be verified (a checkpoint of an older trainrun?); "
                "checkpoint.verify=none accepts it unverified")
    except (OSError, ValueError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    unlisted = sorted(present - set(manifest))
    if unlisted or META_FILE not in manifest:
        return f"{', '.join(unlisted) or META_FILE} not in {MANIFEST_FILE}"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = _file_digest(file, verify == "sha256" and "sha256" in expected)
        if actual["size"] != expected["size"]:
            return f"{name} has {actual['size']} bytes, expected {expected['size']} (truncated?)"
        if "sha256" in actual and actual["sha256"] != expected["sha256"]:
            return f"{name} fails its sha256 check (corrupted)"
    return None


def read_meta(path: Path) -> dict:
    """trainrun's JSON metadata of the checkpoint at ``path``."""
    return json.loads((path / META_FILE).read_text())


def is_checkpoint(path: Path) -> bool:
    """``path`` is one checkpoint (a step directory with its ``trainrun.json``), not a directory of them."""
    return (path / META_FILE).is_file()


def commit_order_key(path: Path) -> tuple[int, int]:
    """Sort key in commit order: (commit_seq, step); an unreadable or older checkpoint has seq -1."""
    try:
        seq = int(read_meta(path).get("commit_seq", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        seq = -1
    m = _STEP_DIR.match(path.name)
    return seq, int(m.group(1)) if m else -1


class CheckpointDir:
    """One checkpoint directory: commits into it, lists, verifies, recovers and prunes its checkpoints.

    Only one process may change it (rank 0 of a run); reading is safe anywhere.
    """

    def __init__(self, path: Path, verify: str = "sha256"):
        self.path, self.verify = path, verify

    def __str__(self) -> str:
        return str(self.path)

    def step_dir(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.path / f"step_{step}"

    def tmp_dir(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is written before it commits."""
        return self.path / f".tmp_step_{step}"

    # ---- committing ---------------------------------------------------------------------------
    def prepare_tmp(self, step: int) -> Path:
        """Recover, remove temp dirs of killed saves, and create the empty temp dir the save of ``step`` writes."""
        tmp = self.tmp_dir(step)
        self.path.mkdir(parents=True, exist_ok=True)
        self.recover()
        for stale in self.path.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
        tmp.mkdir()
        return tmp

    def discard(self, tmp: Path) -> None:
        """Remove the temp dir of a save that failed."""
        shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, step: int, tmp: Path, meta: dict, manifest: dict | None = None, verify: str | None = None) -> Path:
        """Write ``trainrun.json`` and the manifest into ``tmp``, rename it to ``step_<step>`` and replace ``latest``.

        ``manifest``: the other files' entries when built beforehand (an async save hashes in the
        background); ``verify`` overrides this directory's manifest kind (size: no hashing). On an
        OSError ``tmp`` is removed and the directory holds what it held before.
        """
        final = self.step_dir(step)
        try:
            meta = {**meta, "committed_unix": time.time(), "commit_seq": self._next_commit_seq()}
            write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
            if manifest is None:
                manifest = build_manifest(tmp, verify or self.verify)  # covers trainrun.json too
            else:  # built in the background before trainrun.json existed
                manifest = {**manifest, META_FILE: _file_digest(tmp / META_FILE, self.verify == "sha256")}
            write_text_atomic(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
            fsync_dir(tmp)
            old = None
            if final.exists():  # a re-save of the same step: move the old copy aside, drop it after
                old = final.with_name(f".old_{final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.path)
            write_text_atomic(self.path / LATEST_FILE, final.name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _next_commit_seq(self) -> int:
        seqs = [commit_order_key(p)[0] for p in self.checkpoints()]
        return max(seqs, default=-1) + 1

    def recover(self) -> None:
        """Undo a re-save killed between its two renames (rank 0, before anything reads the directory).

        ``.old_step_<N>`` without ``step_<N>`` is the only complete copy of that step: it gets its
        name back. With ``step_<N>`` present the new copy committed and the old one is garbage.
        """
        if not self.path.is_dir():
            return
        for old in self.path.iterdir():
            if (m := _OLD_STEP_DIR.match(old.name)) is None:
                continue
            final = self.step_dir(int(m.group(1)))
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
                fsync_dir(self.path)
                logger.warning("restored %s from %s (a re-save of that step was interrupted)", final, old.name)

    def prune(self, keep_last: int, protect: set[Path]) -> None:
        """Delete complete checkpoints beyond the ``keep_last`` committed last, never one in ``protect``.

        Commit order, not step order: after a rollback the abandoned branch's higher steps go first.
        """
        if keep_last <= 0:
            return
        keep = {p.resolve() for p in protect}
        complete = [p for p in self.in_commit_order() if is_checkpoint(p)]
        for old in complete[keep_last:]:
            if old.resolve() not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- finding ------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Directories named step_<N> (complete or not), lowest step first."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def in_commit_order(self) -> list[Path]:
        """Checkpoint directories, the one committed last first."""
        return sorted(self.checkpoints(), key=commit_order_key, reverse=True)

    def named_latest(self) -> str | None:
        """The name the ``latest`` file holds, if there is one."""
        latest_file = self.path / LATEST_FILE
        return latest_file.read_text().strip() if latest_file.is_file() else None

    def verified(self) -> Iterator[Path]:
        """Checkpoints that verify, the one committed last first; each broken one is reported and skipped.

        The ``latest`` file only confirms: commit order (``commit_seq``) decides, because a kill
        between the rename of a new checkpoint and the update of ``latest`` leaves ``latest`` one
        commit behind.
        """
        latest_file = self.path / LATEST_FILE
        named = self.named_latest()
        ordered = self.in_commit_order()
        if named is None and ordered:
            logger.warning("%s is missing; scanning %s for complete checkpoints", latest_file, self.path)
        names = {p.name for p in ordered}
        skipped: set[str] = set()
        first = True
        for path in ordered:
            if path.name in skipped:
                continue
            problem = verify_checkpoint(path, self.verify)
            if problem is not None:
                logger.warning("skipping checkpoint %s: %s", path, problem)
                skipped.add(path.name)
                continue
            if first and named is not None and path.name != named:
                if named not in names:
                    logger.warning("%s names %s, which does not exist; falling back to %s", latest_file, named, path)
                elif named in skipped or (problem := verify_checkpoint(self.path / named, self.verify)):
                    if named not in skipped:
                        logger.warning("skipping checkpoint %s: %s", self.path / named, problem)
                        skipped.add(named)
                    logger.warning("%s names %s, which is unusable; falling back to %s", latest_file, named, path)
                else:  # killed between the rename and the update of latest
                    logger.warning("%s names %s, but the newer %s is complete; using it", latest_file, named, path)
            first = False
            yield path

    def find_latest(self) -> Path | None:
        """The checkpoint committed last that verifies (broken newer ones are reported and skipped)."""
        return next(self.verified(), None)

    def newest_committed(self) -> Path | None:
        """The checkpoint committed last, verified or not (None if none has its ``trainrun.json``)."""
        committed = next((p for p in self.in_commit_order() if is_checkpoint(p)), None)
        named = self.named_latest()
        if committed is not None and named and named != committed.name:
            logger.warning("%s names %s, but %s was committed after it; using %s",
                           self.path / LATEST_FILE, named, committed.name, committed.name)
        return committed

