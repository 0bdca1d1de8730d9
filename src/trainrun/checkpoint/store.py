"""Saves a checkpoint with every rank: DCP writes the tensors, rank 0 commits the directory, all ranks agree.

The store composes the two halves of a save: :mod:`trainrun.checkpoint.dcp_io` writes each rank's
tensors under the temp name and :mod:`trainrun.checkpoint.layout` (rank 0 alone) turns the temp
directory into a committed checkpoint, then prunes. Every step that can fail on one rank is agreed
on by all (``all_ranks_true``), so either every rank reports the save committed or every rank
raises CheckpointError and the temp directory is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from trainrun.checkpoint.dcp_io import SAVE_ERRORS, DcpWriter, describe_error, raise_if_interrupted, storage_limits
from trainrun.checkpoint.layout import CheckpointDir, build_manifest
from trainrun.errors import CheckpointError

logger = logging.getLogger(__name__)


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
    """Saves (sync or async) and commits checkpoints into one checkpoint directory, with every rank."""

    def __init__(self, directory: Path, keep_last: int, is_rank0: bool, barrier: Callable[[], None],
                 verify: str = "sha256", all_ranks_true: Callable[[bool], bool] | None = None):
        self.directory = CheckpointDir(directory, verify)
        """The directory's protocol (listing, verifying, committing, pruning); rank 0 alone changes it."""
        self.keep_last, self.is_rank0, self.barrier, self.verify = keep_last, is_rank0, barrier, verify
        self.all_true = all_ranks_true or (lambda flag: flag)
        self.pending: PendingSave | None = None
        self._writer = DcpWriter()

    def step_dir(self, step: int) -> Path:
        """Final directory of the checkpoint of ``step``."""
        return self.directory.step_dir(step)

    def _prepare_tmp(self, step: int) -> Path:
        tmp, error = self.directory.tmp_dir(step), None
        if self.is_rank0:
            try:
                self.directory.prepare_tmp(step)
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
            self._writer.save(tensors, tmp)
        except SAVE_ERRORS as err:
            self._discard(tmp)
            raise_if_interrupted(err)
            raise CheckpointError(f"saving step {step} to {tmp} failed: {describe_error(err)} "
                                  f"({storage_limits(self.directory.path)})") from err
        return self._commit(step, tmp, meta, protect, verify=verify)

    def save_async(self, step: int, tensors: dict, meta: dict, protect: set[Path] = frozenset()) -> None:
        """Start an async save: staging copies the state in the background, then files are written.

        Call ``wait_for_staging()`` before parameters change (the next optimizer step) and
        ``finalize()`` to commit; the previous async save is finalised first. Rank 0 also fsyncs
        and hashes the written files in the background, so committing blocks only for renames.
        """
        self.finalize(blocking=True, protect=protect)
        tmp = self._prepare_tmp(step)
        started = time.perf_counter()
        manifest = (lambda: build_manifest(tmp, self.verify)) if self.is_rank0 else (lambda: None)
        try:
            staging, upload = self._writer.save_async(tensors, tmp, then=manifest)
        except SAVE_ERRORS as err:
            self._discard(tmp)
            raise_if_interrupted(err)
            raise CheckpointError(f"starting the async save of step {step} to {tmp} failed: "
                                  f"{describe_error(err)}") from err
        self.pending = PendingSave(step, tmp, meta, staging, upload, started)

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
        except SAVE_ERRORS as err:  # reported below, after all ranks agree
            error = err
        if not self.all_true(error is None):
            self._discard(pending.tmp)
            raise CheckpointError(f"async save of step {pending.step} to {pending.tmp} failed: "
                                  f"{describe_error(error) if error else 'failed on another rank'} "
                                  f"({storage_limits(self.directory.path)})") from error
        path = self._commit(pending.step, pending.tmp, pending.meta, protect, manifest)
        logger.info("async checkpoint %s committed %.2fs after it started", path, time.perf_counter() - pending.started)
        return path

    def _discard(self, tmp: Path) -> None:
        self.barrier()
        if self.is_rank0:
            self.directory.discard(tmp)

    def _commit(self, step: int, tmp: Path, meta: dict, protect: set[Path], manifest: dict | None = None,
                verify: str | None = None) -> Path:
        final = self.step_dir(step)
        self.barrier()  # every rank's files are written
        error = None
        if self.is_rank0:
            try:
                self.directory.commit(step, tmp, meta, manifest, verify)
            except OSError as err:
                error = err
            else:
                self.directory.prune(self.keep_last, protect | {final})
        if not self.all_true(error is None):
            raise CheckpointError(f"committing step {step} in {self.directory} failed: {error or 'failed on rank 0'}")
        return final

    def close(self, protect: set[Path] = frozenset()) -> None:
        """Finalise any pending save and release the stager."""
        try:
            self.finalize(blocking=True, protect=protect)
        finally:
            self._writer.close()
