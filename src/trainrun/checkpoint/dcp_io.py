"""Tensors in and out of a checkpoint with torch.distributed.checkpoint (DCP): sync and async writes, safe loads.

DCP writes each rank's shards and a ``.metadata`` file into a directory and reshards on load.
Writing here knows nothing of the checkpoint directory's protocol (temp names, manifests, commit
order: :mod:`trainrun.checkpoint.layout`); loading unpickles nothing but DCP's own metadata
classes (:mod:`trainrun.checkpoint.safe_reader`) and reads only the tensors trainrun writes itself.
"""

from __future__ import annotations

import logging
import os
import resource
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from trainrun.checkpoint.safe_reader import SafeFileSystemReader
from trainrun.checkpoint.separate_qkv import FUSED, fuse_values, has_separate_qkv, separate_qkv_error, separate_sources
from trainrun.distributed.full_tensor import copy_full_into
from trainrun.errors import CheckpointError, CheckpointMismatch

# Without a process group DCP warns (also from its async writer thread) that it saves from one
# process: that is what trainrun intends in a single-process run.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

logger = logging.getLogger(__name__)

KNOWN_SECTIONS = ("model", "optim", "rng")
"""Top-level entries of trainrun's DCP state; anything else marks a foreign checkpoint."""

SAVE_ERRORS = (Exception, CheckpointException)
"""DCP reports failures (e.g. ENOSPC) as CheckpointException, which derives from BaseException."""

T = TypeVar("T")



def raise_if_interrupted(err: BaseException) -> None:
    """Re-raise a KeyboardInterrupt that DCP wrapped into a CheckpointException.

    DCP catches BaseException in its collectives and reports it per rank, so a second Ctrl-C
    (the exit controller raises KeyboardInterrupt) would otherwise read as a failed save or a
    damaged checkpoint: the run would train on, or fall back to an older checkpoint.
    """
    causes = [exc for exc, _ in err.failures.values()] if isinstance(err, CheckpointException) else []
    if isinstance(err, KeyboardInterrupt) or any(isinstance(exc, KeyboardInterrupt) for exc in causes):
        raise KeyboardInterrupt from err


def describe_error(err: BaseException | None) -> str:
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


class DcpWriter:
    """Writes this rank's tensors into a directory, synchronously or in the background.

    Errors are DCP's own (:data:`SAVE_ERRORS`); the caller reports them and cleans up.
    """

    def __init__(self) -> None:
        self._stager: DefaultStager | None = None
        self._async_pg = None
        self._finisher: ThreadPoolExecutor | None = None

    def save(self, tensors: dict, directory: Path) -> None:
        """Write ``tensors`` into ``directory`` and return once every rank's files are written."""
        dcp.save(tensors, checkpoint_id=str(directory))

    def save_async(self, tensors: dict, directory: Path, then: Callable[[], T]) -> tuple[Future | None, Future[T]]:
        """Start writing ``tensors`` into ``directory``; returns (staging done, files written and ``then()`` run).

        Staging copies the state in the background: parameters may change once the first future
        is done. ``then`` runs in a background thread after this rank's files are written.
        """
        if self._stager is None:
            # Pinned host buffers when the model lives on CUDA (torchtitan's async_with_pinned_mem): the copy out of
            # the device is then a fast DMA; CPU tensors need none. No shared memory: the writer is a thread.
            # Background staging overlaps forward/backward.
            model = tensors.get("model", tensors)
            pinned = torch.cuda.is_available() and any(getattr(t, "is_cuda", False) for t in model.values())
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=False))
        if self._async_pg is None and dist.is_initialized():
            # The writer thread runs collectives; a separate gloo group keeps them off the training group.
            self._async_pg = dist.new_group(backend="gloo")
        response = dcp.async_save(tensors, checkpoint_id=str(directory), async_stager=self._stager,
                                  process_group=self._async_pg)
        staging = getattr(response, "staging_completion", None)
        upload = getattr(response, "upload_completion", response)
        if self._finisher is None:
            self._finisher = ThreadPoolExecutor(1, thread_name_prefix="trainrun-ckpt-finish")
        return staging, self._finisher.submit(_after, upload, then)

    def close(self) -> None:
        """Release the stager and the background thread (after the last async save finished)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._finisher is not None:
            self._finisher.shutdown(wait=True)
            self._finisher = None


def _after(upload: Future, then: Callable[[], T]) -> T:
    upload.result()
    return then()


def read_tensor_metadata(path: Path, reader: SafeFileSystemReader | None = None) -> dict:
    """DCP's description (name -> storage metadata) of every entry of the checkpoint at ``path``, unpickling
    nothing but DCP's own classes; raises CheckpointError if it is unusable."""
    try:
        return (reader or SafeFileSystemReader(str(path))).read_metadata().state_dict_metadata
    except Exception as err:  # UnsafeCheckpointError, truncated or garbage pickle
        raise CheckpointError(f"checkpoint {path} has unusable DCP metadata: {err}") from err


def load_tensors(path: Path, tensors: dict, qkv_groups: int | None = None) -> None:
    """Load DCP tensors in place into ``tensors`` (resharding as needed), unpickling nothing.

    ``qkv_groups``: the model's key/value heads; given, a checkpoint written before q/k/v were fused
    (:mod:`trainrun.checkpoint.separate_qkv`) loads too, each ``attention.wqkv`` entry fused from its
    three stored ones. Raises CheckpointMismatch for an intact checkpoint that lacks entries of
    ``tensors`` or holds them in other shapes, CheckpointError for anything else.
    """
    reader = SafeFileSystemReader(str(path))
    stored = read_tensor_metadata(path, reader)
    foreign = sorted(k for k, v in stored.items()
                     if k.split(".", 1)[0] not in KNOWN_SECTIONS or isinstance(v, BytesStorageMetadata))
    if foreign:
        raise CheckpointError(f"checkpoint {path} holds unexpected entries (e.g. {foreign[:3]}); "
                              "trainrun only loads checkpoints with tensors it wrote itself")
    missing = sorted(set(_flatten_keys(tensors)) - set(stored))
    fused = _fused_entries(path, missing, stored, qkv_groups)
    if missing and not fused:
        raise CheckpointMismatch(f"checkpoint {path} lacks {len(missing)} entries (e.g. {missing[:3]})")
    resized = _resized(tensors, stored)
    if resized:
        raise CheckpointMismatch(f"checkpoint {path} holds {len(resized)} tensors of other shapes (e.g. "
                                 + ", ".join(resized[:3]) + ")")
    try:
        dcp.load(_without(tensors, fused), storage_reader=reader)
        targets = dict(_flatten_items(tensors))
        for key, parts in fused.items():  # one entry at a time: every rank holds one full q, k, v at most
            full = {part: torch.empty(tuple(stored[part].size), dtype=stored[part].properties.dtype)
                    for part in parts}
            dcp.load(full, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)  # ranks differ (PP)
            value, target = fuse_values(*(full[part] for part in parts), qkv_groups), targets[key]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointMismatch(f"checkpoint {path}: {', '.join(parts)} make {key} of shape "
                                         f"{list(value.shape)}, but the model's is {list(target.shape)}")
            copy_full_into(target, value.to(target.device))
    except CheckpointMismatch:
        raise
    except SAVE_ERRORS as err:
        raise_if_interrupted(err)
        raise CheckpointError(f"loading checkpoint {path} failed: {describe_error(err)}") from err
    if fused:
        logger.info("%s: read %d entries of separate attention.wq/wk/wv as attention.wqkv (the next save "
                    "writes them fused)", path, len(fused))


def _fused_entries(path: Path, missing: list[str], stored: dict, qkv_groups: int | None) -> dict[str, tuple]:
    """Missing ``attention.wqkv`` entries -> the three stored ones to fuse them from ({} for a current
    checkpoint); raises when the checkpoint is in the old layout but cannot be read as the new one."""
    if not missing or not has_separate_qkv(stored):
        return {}
    fused = {key: separate_sources(key) for key in missing if FUSED in key}
    complete = len(fused) == len(missing) and all(p in stored for parts in fused.values() for p in parts)
    if qkv_groups is None or not complete:
        raise separate_qkv_error(f"checkpoint {path}", stored)
    return fused


def _without(tensors: dict, keys: dict) -> dict:
    """``tensors`` (sections of flat entries) less the flattened ``keys``."""
    return {section: {k: v for k, v in entries.items() if f"{section}.{k}" not in keys}
            if isinstance(entries, dict) else entries for section, entries in tensors.items()}


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
    return [name for name, _ in _flatten_items(tree, prefix)]
