"""Checkpoint directory layout and atomic commits with torch.distributed.checkpoint (DCP).

Layout under a checkpoint dir::

    step_<N>/            a complete checkpoint: DCP shards + .metadata + trainrun.json + manifest.json
    .tmp_step_<N>/       being written; never read, removed on the next save
    .old_step_<N>/       the previous copy of step_<N> while a re-save of that step commits
    latest               text file naming the newest complete checkpoint, replaced last

A checkpoint is written under its temp name, its manifest (size and sha256 of every file) is
written, everything is fsync'ed, the directory is renamed, and only then is ``latest`` replaced
(write-temp-fsync-rename). A kill at any moment leaves either the old or the new checkpoint
complete: a re-save of an existing step moves the old copy to ``.old_step_<N>`` first, and
``recover()`` moves it back if the kill came before the new copy took its name. Tensors go
through DCP; everything else is JSON, so resuming unpickles nothing (see ``safe_reader``).

Order is commit order, not step order: every commit records ``commit_seq``, one more than any
checkpoint in the directory. After a rollback (resuming an older step, a weights-only resume)
the new branch's checkpoints are the newest even with lower step numbers, so ``find_latest``
returns to the branch that was committed last and retention prunes the abandoned one first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from trainrun.checkpoint.safe_reader import SafeFileSystemReader
from trainrun.errors import CheckpointError

logger = logging.getLogger(__name__)

# Without a process group DCP warns (also from its async writer thread) that it saves from one
# process: that is what trainrun intends in a single-process run.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

META_FILE = "trainrun.json"
MANIFEST_FILE = "manifest.json"
"""Size (and sha256) of every other file of a checkpoint, trainrun.json included; written last."""
LATEST_FILE = "latest"
KNOWN_SECTIONS = ("model", "optim", "rng")
"""Top-level entries of trainrun's DCP state; anything else marks a foreign checkpoint."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_STEP_DIR = re.compile(r"^\.old_step_(\d+)$")


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint whose tensors do not fit the state being loaded (another model shape, another
    optimizer): a configuration problem, never a reason to fall back to an older checkpoint."""


_SAVE_ERRORS = (Exception, CheckpointException)
"""DCP reports failures (e.g. ENOSPC) as CheckpointException, which derives from BaseException."""


def raise_if_interrupted(err: BaseException) -> None:
    """Re-raise a KeyboardInterrupt that DCP wrapped into a CheckpointException.

    DCP catches BaseException in its collectives and reports it per rank, so a second Ctrl-C
    (the exit controller raises KeyboardInterrupt) would otherwise read as a failed save or a
    damaged checkpoint: the run would train on, or fall back to an older checkpoint.
    """
    causes = [exc for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else []
    if isinstance(err, KeyboardInterrupt) or any(isinstance(exc, KeyboardInterrupt) for exc in causes):
        raise KeyboardInterrupt from err


def _describe(err: BaseException | None) -> str:
    """One line for an error; DCP's CheckpointException becomes its per-rank root causes."""
    if isinstance(err, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in err.failures.items())
    return f"{type(err).__name__}: {err}" if err is not None else "unknown error"


def storage_limits(directory: Path) -> str:
    """Free space and the file size limit where ``directory`` lives, to add to a failed save's message.

    Writers deep inside DCP report a full disk or an exceeded ``ulimit -f`` (EFBIG) in their own
    words (e.g. "unexpected pos 704 vs 598"); these two numbers name the usual causes.
    """
    parts = []
    probe = directory if directory.exists() else directory.parent
    try:
        stats = os.statvfs(probe)
        parts.append(f"{stats.f_bavail * stats.f_frsize / 2**20:.1f} MiB free on {probe}")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        parts.append(f"file size limit (ulimit -f) {limit / 2**10:.0f} KiB")
    return "; ".join(parts)


def _fsync_dir(path: Path) -> None:
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
    _fsync_dir(path.parent)


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


@dataclass
class PendingSave:
    """An async save whose files are still being written."""

    step: int
    tmp: Path
    meta: dict
    staging: Future | None
    upload: Future
    """Done when DCP wrote this rank's files and (rank 0) the manifest is built; its result is the manifest."""
    started: float


class CheckpointStore:
    """Saves (sync or async), lists, verifies, prunes and loads checkpoints in one directory."""

    def __init__(self, directory: Path, keep_last: int, is_rank0: bool, barrier: Callable[[], None],
                 verify: str = "sha256", all_ranks_true: Callable[[bool], bool] | None = None):
        self.directory, self.keep_last, self.is_rank0, self.barrier = directory, keep_last, is_rank0, barrier
        self.verify = verify
        self.all_true = all_ranks_true or (lambda flag: flag)
        self.pending: PendingSave | None = None
        self._stager: DefaultStager | None = None
        self._async_pg = None
        self._finisher: ThreadPoolExecutor | None = None

    def step_dir(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.directory / f"step_{step}"

    # ---- saving -------------------------------------------------------------------------
    def _prepare_tmp(self, step: int) -> Path:
        tmp = self.directory / f".tmp_step_{step}"
        error = None
        if self.is_rank0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.recover()
                for stale in self.directory.glob(".tmp_step_*"):
                    shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
                tmp.mkdir()
            except OSError as err:
                error = err
        if not self.all_true(error is None):
            raise CheckpointError(f"cannot create {tmp}: {error or 'failed on rank 0'}")
        return tmp

    def save(self, step: int, tensors: dict, meta: dict, protect: set[Path] = frozenset(),
             verify: str | None = None) -> Path:
        """Write and commit a checkpoint synchronously; raise CheckpointError (tmp removed) on failure.

        ``verify`` overrides the store's manifest kind for this checkpoint (size: no hashing)."""
        self.finalize(blocking=True, protect=protect)
        tmp = self._prepare_tmp(step)
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))
        except _SAVE_ERRORS as err:
            self._discard(tmp)
            raise_if_interrupted(err)
            raise CheckpointError(f"saving step {step} to {tmp} failed: {_describe(err)} "
                                  f"({storage_limits(self.directory)})") from err
        return self._commit(step, tmp, meta, protect, verify=verify)

    def save_async(self, step: int, tensors: dict, meta: dict, protect: set[Path] = frozenset()) -> None:
        """Start an async save: staging copies the state in the background, then files are written.

        Call ``wait_for_staging()`` before parameters change (the next optimizer step) and
        ``finalize()`` to commit; the previous async save is finalised first. Rank 0 also fsyncs
        and hashes the written files in the background, so committing blocks only for renames.
        """
        self.finalize(blocking=True, protect=protect)
        tmp = self._prepare_tmp(step)
        if self._stager is None:
            # No pinned/shared memory: they need CUDA; background staging overlaps forward/backward.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=False))
        if self._async_pg is None and dist.is_initialized():
            # The writer thread runs collectives; a separate gloo group keeps them off the training group.
            self._async_pg = dist.new_group(backend="gloo")
        started = time.perf_counter()
        try:
            response = dcp.async_save(tensors, checkpoint_id=str(tmp), async_stager=self._stager,
                                      process_group=self._async_pg)
        except _SAVE_ERRORS as err:
            self._discard(tmp)
            raise_if_interrupted(err)
            raise CheckpointError(f"starting the async save of step {step} to {tmp} failed: {_describe(err)}") from err
        staging = getattr(response, "staging_completion", None)
        upload = getattr(response, "upload_completion", response)
        if self._finisher is None:
            self._finisher = ThreadPoolExecutor(1, thread_name_prefix="trainrun-ckpt-finish")
        finished = self._finisher.submit(self._finish_upload, upload, tmp)
        self.pending = PendingSave(step, tmp, meta, staging, finished, started)

    def _finish_upload(self, upload: Future, tmp: Path) -> dict | None:
        """Background: wait for DCP's writes; on rank 0 then fsync and hash them (the manifest)."""
        upload.result()
        return build_manifest(tmp, self.verify) if self.is_rank0 else None

    def wait_for_staging(self) -> None:
        """Block until the pending async save has copied the state (parameters may change after)."""
        if self.pending is not None and self.pending.staging is not None:
            self.pending.staging.result()

    def finalize(self, blocking: bool, protect: set[Path] = frozenset()) -> Path | None:
        """Commit the pending async save once every rank finished writing; returns its path if committed."""
        pending = self.pending
        if pending is None:
            return None
        if not self.all_true(blocking or pending.upload.done()):
            return None
        self.pending = None
        error, manifest = None, None
        try:
            manifest = pending.upload.result()
        except _SAVE_ERRORS as err:  # reported below, after all ranks agree
            error = err
        if not self.all_true(error is None):
            self._discard(pending.tmp)
            raise CheckpointError(f"async save of step {pending.step} to {pending.tmp} failed: "
                                  f"{_describe(error) if error else 'failed on another rank'} "
                                  f"({storage_limits(self.directory)})") from error
        path = self._commit(pending.step, pending.tmp, pending.meta, protect, manifest)
        logger.info("async checkpoint %s committed %.2fs after it started", path, time.perf_counter() - pending.started)
        return path

    def _discard(self, tmp: Path) -> None:
        self.barrier()
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, step: int, tmp: Path, meta: dict, protect: set[Path], manifest: dict | None = None,
                verify: str | None = None) -> Path:
        final = self.step_dir(step)
        self.barrier()  # every rank's files are written
        error = None
        if self.is_rank0:
            try:
                meta = {**meta, "committed_unix": time.time(), "commit_seq": self._next_commit_seq()}
                write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
                if manifest is None:
                    manifest = build_manifest(tmp, verify or self.verify)  # covers trainrun.json too
                else:  # built in the background before trainrun.json existed
                    manifest = {**manifest, META_FILE: _file_digest(tmp / META_FILE, self.verify == "sha256")}
                write_text_atomic(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
                _fsync_dir(tmp)
                old = None
                if final.exists():  # a re-save of the same step: move the old copy aside, drop it after
                    old = final.with_name(f".old_{final.name}")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                os.replace(tmp, final)
                _fsync_dir(self.directory)
                write_text_atomic(self.directory / LATEST_FILE, final.name + "\n")
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                error = err
            else:
                self._prune(protect | {final})
        if not self.all_true(error is None):
            raise CheckpointError(f"committing step {step} in {self.directory} failed: {error or 'failed on rank 0'}")
        return final

    def close(self, protect: set[Path] = frozenset()) -> None:
        """Finalise any pending save and release the stager."""
        try:
            self.finalize(blocking=True, protect=protect)
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
                self._finisher = None

    # ---- finding and loading ------------------------------------------------------------
    def recover(self) -> None:
        """Undo a re-save killed between its two renames (rank 0, before anything reads the directory).

        ``.old_step_<N>`` without ``step_<N>`` is the only complete copy of that step: it gets its
        name back. With ``step_<N>`` present the new copy committed and the old one is garbage.
        """
        if not self.directory.is_dir():
            return
        for old in self.directory.iterdir():
            if (m := _OLD_STEP_DIR.match(old.name)) is None:
                continue
            final = self.step_dir(int(m.group(1)))
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
                _fsync_dir(self.directory)
                logger.warning("restored %s from %s (a re-save of that step was interrupted)", final, old.name)

    def checkpoints(self) -> list[Path]:
        """Directories named step_<N> (complete or not), lowest step first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    @staticmethod
    def commit_order_key(path: Path) -> tuple[int, int]:
        """Sort key in commit order: (commit_seq, step); an unreadable or older checkpoint has seq -1."""
        try:
            meta = CheckpointStore.read_meta(path)
            seq = int(meta.get("commit_seq", -1))
        except (OSError, ValueError, TypeError, AttributeError):
            seq = -1
        m = _STEP_DIR.match(path.name)
        return seq, int(m.group(1)) if m else -1

    def in_commit_order(self) -> list[Path]:
        """Checkpoint directories, the one committed last first."""
        return sorted(self.checkpoints(), key=self.commit_order_key, reverse=True)

    def _next_commit_seq(self) -> int:
        seqs = [self.commit_order_key(p)[0] for p in self.checkpoints()]
        return max(seqs, default=-1) + 1

    def verified(self) -> Iterator[Path]:
        """Checkpoints that verify, the one committed last first; each broken one is reported and skipped.

        The ``latest`` file only confirms: commit order (``commit_seq``) decides, because a kill
        between the rename of a new checkpoint and the update of ``latest`` leaves ``latest`` one
        commit behind.
        """
        latest_file = self.directory / LATEST_FILE
        named = latest_file.read_text().strip() if latest_file.is_file() else None
        ordered = self.in_commit_order()
        if named is None and ordered:
            logger.warning("%s is missing; scanning %s for complete checkpoints", latest_file, self.directory)
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
                elif named in skipped or (problem := verify_checkpoint(self.directory / named, self.verify)):
                    if named not in skipped:
                        logger.warning("skipping checkpoint %s: %s", self.directory / named, problem)
                        skipped.add(named)
                    logger.warning("%s names %s, which is unusable; falling back to %s", latest_file, named, path)
                else:  # killed between the rename and the update of latest
                    logger.warning("%s names %s, but the newer %s is complete; using it", latest_file, named, path)
            first = False
            yield path

    def find_latest(self) -> Path | None:
        """The checkpoint committed last that verifies (broken newer ones are reported and skipped)."""
        return next(self.verified(), None)

    def _prune(self, protect: set[Path]) -> None:
        """Delete complete checkpoints beyond the ``keep_last`` committed last, never one in ``protect``.

        Commit order, not step order: after a rollback the abandoned branch's higher steps go first.
        """
        if self.keep_last <= 0:
            return
        keep = {p.resolve() for p in protect}
        complete = [p for p in self.in_commit_order() if (p / META_FILE).is_file()]
        for old in complete[self.keep_last:]:
            if old.resolve() not in keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_meta(path: Path) -> dict:
        """trainrun's JSON metadata of the checkpoint at ``path``."""
        return json.loads((path / META_FILE).read_text())

    @staticmethod
    def load_tensors(path: Path, tensors: dict) -> None:
        """Load DCP tensors in place into ``tensors`` (resharding as needed), unpickling nothing."""
        reader = SafeFileSystemReader(str(path))
        try:
            stored = reader.read_metadata().state_dict_metadata
        except Exception as err:  # UnsafeCheckpointError, truncated or garbage pickle
            raise CheckpointError(f"checkpoint {path} has unusable DCP metadata: {err}") from err
        foreign = sorted(k for k, v in stored.items()
                         if k.split(".", 1)[0] not in KNOWN_SECTIONS or isinstance(v, BytesStorageMetadata))
        if foreign:
            raise CheckpointError(f"checkpoint {path} holds unexpected entries (e.g. {foreign[:3]}); "
                                  "trainrun only loads checkpoints with tensors it wrote itself")
        missing = sorted(set(_flatten_keys(tensors)) - set(stored))
        if missing:
            raise CheckpointMismatch(f"checkpoint {path} lacks {len(missing)} entries (e.g. {missing[:3]})")
        resized = _resized(tensors, stored)
        if resized:
            raise CheckpointMismatch(f"checkpoint {path} holds {len(resized)} tensors of other shapes (e.g. "
                                     + ", ".join(resized[:3]) + ")")
        try:
            dcp.load(tensors, storage_reader=reader)
        except _SAVE_ERRORS as err:
            raise_if_interrupted(err)
            raise CheckpointError(f"loading checkpoint {path} failed: {_describe(err)}") from err


def _resized(tensors: dict, stored: dict) -> list[str]:
    """'<name> <saved shape> -> <wanted shape>' for each tensor whose global shape differs from the stored one."""
    found = []
    for key, value in _flatten_items(tensors):
        saved = getattr(stored.get(key), "size", None)
        if saved is not None and hasattr(value, "shape") and tuple(saved) != tuple(value.shape):
            found.append(f"{key} {list(saved)} -> {list(value.shape)}")
    return found


def _flatten_items(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        items += _flatten_items(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return items


def _flatten_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        keys += _flatten_keys(value, name + ".") if isinstance(value, dict) else [name]
    return keys
