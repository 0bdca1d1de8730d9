"""Per-epoch shuffles built once, stored beside the data, and memory-mapped by every rank.

A split's samples need no index (sample ``i`` is one slice of the token stream, see
:mod:`trainrun.data.loader`); the one per-dataset array is each epoch's shuffle, ``num_samples``
int64 values (about 4 GB at 1T tokens and seq_len 2048). Computing it on every rank holds that in
every rank's private memory; here it is built once and every rank maps it, so a rank keeps only
the pages it touches (a few KB per batch), and the page cache holds one copy per node.

Layout, under a cache root (``paths.cache_dir``, or next to the data)::

    <root>/indices/<key[:32]>/desc.json           what the index was built for (human-readable)
                              shuffle-e<E>.npy    epoch E's order: int32 (int64 from 2**31 samples)
                              shuffle-e<E>.json   its check: key, epoch and sampled values

``key`` is the sha256 of the canonical JSON of the description: the format version, the kind
("shuffle"), the caller's ``identity`` (the dataset's checksum, split, document and token range,
seq_len), ``num_samples`` and ``seed``, as Megatron names its doc/sample/shuffle index files by a
hash of their inputs. The values are exactly :func:`trainrun.data.loader.epoch_permutation`, so a
run reads the same samples with or without the cache, and checkpoints resume identically.

Never used unless checked: opening an epoch compares ``desc.json`` with the expected description,
the array's shape and dtype, and the check file's key, epoch and values at a few positions (which
a file of another seed or epoch fails; the values depend on nothing else). A file that fails
(built for other inputs, copied, truncated, corrupt) is reported by name and rebuilt, or the order
is computed in memory where the cache cannot be written. Every file is written under a temporary
name in its directory, fsynced and renamed into place, so builders racing on a shared file system,
or killed, never expose a partial file; racing builders write identical bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from trainrun.data.loader import epoch_permutation

if TYPE_CHECKING:
    from trainrun.distributed.env import DistEnv

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_DIR = "indices"
DESC_FILE = "desc.json"
KEY_CHARS = 32  # 128 bits of the sha256 name the directory; desc.json holds the full inputs
NUM_PROBES = 32  # sampled values per epoch file: detects another seed's or epoch's file almost surely
WRITE_CHUNK = 1 << 24  # values converted and written per step while building (64 MiB of int32)


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that the key hashes (sorted keys, no spaces, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def order_dtype(num_samples: int) -> np.dtype:
    """int32 while every sample index fits (half the size of int64), else int64."""
    return np.dtype(np.int32) if num_samples < 2**31 else np.dtype(np.int64)


class CachedEpochOrder:
    """Per-epoch sample orders of one stream, read from (and written to) the on-disk cache.

    Implements :class:`trainrun.data.loader.EpochOrder`: :meth:`permutation` returns a read-only
    memory map, or, where the cache lacks a valid file, the order computed in memory (same values).
    Build epochs ahead of training with :func:`prepare_epoch_orders` (or :meth:`ensure`).
    """

    def __init__(self, cache_root: str | os.PathLike, identity: dict[str, Any], num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.dtype = order_dtype(self.num_samples)
        # Round-tripped through JSON so that it compares equal to what desc.json holds (tuples become lists).
        self.description: dict[str, Any] = json.loads(canonical_json({
            "format_version": FORMAT_VERSION, "kind": "shuffle", "identity": identity,
            "num_samples": self.num_samples, "seed": self.seed}))
        self.key = hashlib.sha256(canonical_json(self.description).encode()).hexdigest()
        self.directory = Path(cache_root) / INDEX_DIR / self.key[:KEY_CHARS]
        self._desc_checked = False
        self._warned_missing: set[int] = set()

    def __repr__(self) -> str:
        return f"CachedEpochOrder({str(self.directory)!r}, num_samples={self.num_samples}, seed={self.seed})"

    def epoch_path(self, epoch: int) -> Path:
        """The ``.npy`` file holding epoch ``epoch``'s order."""
        return self.directory / f"shuffle-e{int(epoch)}.npy"

    def _check_path(self, epoch: int) -> Path:
        return self.directory / f"shuffle-e{int(epoch)}.json"

    # ---- reading --------------------------------------------------------------------------------

    def open(self, epoch: int) -> tuple[np.ndarray | None, str | None]:
        """``(order, None)`` for a valid cached epoch; ``(None, problem)`` otherwise (problem None: missing).

        Reads the headers and :data:`NUM_PROBES` values only: the order stays memory-mapped, not resident.
        """
        path = self.epoch_path(epoch)
        if not path.exists():
            return None, None
        problem = self._check_desc()
        if problem is not None:
            return None, problem
        try:
            order = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # a truncated or garbled file
            return None, f"{path} cannot be read as an array ({err})"
        if order.shape != (self.num_samples,) or order.dtype != self.dtype:
            return None, (f"{path} holds {order.dtype} of shape {order.shape}, expected {self.dtype} of shape "
                          f"({self.num_samples},): it was built for other inputs, or is truncated")
        try:
            check = json.loads(self._check_path(epoch).read_text())
            positions = np.asarray(check["positions"], dtype=np.int64)
            values = np.asarray(check["values"], dtype=np.int64)
            same_inputs = check["key"] == self.key and check["epoch"] == int(epoch)
        except (OSError, ValueError, KeyError, TypeError) as err:
            return None, f"{self._check_path(epoch)} (the check of {path.name}) is missing or unreadable ({err})"
        if not same_inputs:
            return None, f"{self._check_path(epoch)} was written for another index or epoch"
        if positions.shape != values.shape or positions.size == 0 or not np.array_equal(order[positions], values):
            return None, f"{path} holds other values than were built for these inputs (copied from another index?)"
        return order, None

    def _check_desc(self) -> str | None:
        """None when ``desc.json`` describes exactly these inputs (read once per object), else the problem."""
        if self._desc_checked:
            return None
        path = self.directory / DESC_FILE
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"{path} is missing or unreadable ({err})"
        if found != self.description:
            return f"{path} describes other inputs than {canonical_json(self.description)}"
        self._desc_checked = True
        return None

    def missing(self, epochs: int) -> list[int]:
        """Which of epochs ``0 .. epochs-1`` have no valid file here (cheap: headers and probes)."""
        return [e for e in range(epochs) if self.open(e)[0] is None]

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s sample order: the cached file, memory-mapped, or computed in memory.

        A missing file is computed in memory (warned once per epoch); an invalid one is reported,
        rebuilt and mapped, or computed in memory when the cache cannot be written.
        """
        order, problem = self.open(epoch)
        if order is not None:
            return order
        if problem is None:
            if epoch not in self._warned_missing:
                self._warned_missing.add(epoch)
                logger.warning("shuffle cache %s lacks epoch %d; computing its order in memory (%d samples) "
                               "instead of mapping it", self.directory, epoch, self.num_samples)
            return epoch_permutation(self.seed, epoch, self.num_samples)
        logger.warning("not using a cached shuffle: %s; rebuilding it", problem)
        built = self._build(epoch)
        if built is not None:
            return built
        order, problem = self.open(epoch)
        if order is None:  # another writer's file, or our own, did not survive the check: never guess
            logger.warning("rebuilt shuffle still fails its check (%s); computing epoch %d in memory", problem, epoch)
            return epoch_permutation(self.seed, epoch, self.num_samples)
        return order

    # ---- building -------------------------------------------------------------------------------

    def ensure(self, epochs: int) -> list[int]:
        """Build every epoch of ``0 .. epochs-1`` without a valid file; returns the epochs written.

        Invalid files are reported and replaced. Holds one epoch's order in memory at a time.
        Raises OSError when the cache cannot be written.
        """
        built = []
        for epoch in range(epochs):
            order, problem = self.open(epoch)
            if order is not None:
                continue
            if problem is not None:
                logger.warning("not using a cached shuffle: %s; rebuilding it", problem)
            self._write_epoch(epoch)
            built.append(epoch)
        return built

    def _build(self, epoch: int) -> np.ndarray | None:
        """Write epoch ``epoch``; None when it was written (map it), else the in-memory order (read-only cache)."""
        try:
            self._write_epoch(epoch)
            return None
        except OSError as err:
            logger.warning("cannot write the shuffle cache %s (%s); computing epoch %d in memory",
                           self.directory, err, epoch)
            return epoch_permutation(self.seed, epoch, self.num_samples)

    def _write_epoch(self, epoch: int) -> None:
        """Compute epoch ``epoch`` and publish its ``.npy`` and check file (and ``desc.json`` if needed)."""
        self._write_desc()
        order = epoch_permutation(self.seed, epoch, self.num_samples)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.num_samples,)}

        def write_npy(f: IO[bytes]) -> None:
            np.lib.format.write_array_header_1_0(f, header)
            # Converted in chunks: the int64 order is the only full-size array held while building.
            for start in range(0, self.num_samples, WRITE_CHUNK):
                f.write(order[start : start + WRITE_CHUNK].astype(self.dtype).tobytes())

        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1]))
        positions = np.unique(np.concatenate([[0, self.num_samples - 1],
                                              rng.integers(0, self.num_samples, NUM_PROBES - 2)]))
        check = {"key": self.key, "epoch": int(epoch), "positions": positions.tolist(),
                 "values": order[positions].tolist()}
        # The .npy first: a check file in place means its array was complete when it was written.
        _atomic_write(self.epoch_path(epoch), write_npy)
        _atomic_write(self._check_path(epoch), lambda f: f.write(json.dumps(check).encode()))

    def _write_desc(self) -> None:
        if self._check_desc() is None:
            return
        text = json.dumps(self.description, indent=2, sort_keys=True) + "\n"
        _atomic_write(self.directory / DESC_FILE, lambda f: f.write(text.encode()))
        self._desc_checked = True


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write`` under a temporary name beside it, fsync, then rename into place.

    Readers (other ranks, other nodes on a shared file system) see the old file or the complete new
    one, never a partial one; a crash leaves only a ``.tmp-`` file. Raises OSError (read-only cache).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other users' jobs may share the cache
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename is durable once the directory is synced (a node crash must not lose a file readers saw).
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prepare_epoch_orders(needs: list[tuple[CachedEpochOrder, int]], env: DistEnv) -> None:
    """Build, once for the whole job, every ``(order, epochs)`` of ``needs`` that the cache lacks.

    Global rank 0 builds what is missing, then all ranks meet. Each rank then checks it sees every
    file; if any rank does not (a cache on node-local disk seen from another node), local rank 0
    of each node that misses files builds them there, and all ranks meet again. A rank that still
    misses an epoch (an unwritable cache) computes it in memory when it gets there, with a warning.
    """
    started = time.perf_counter()
    built: list[str] = []

    def build_here() -> None:
        for order, epochs in needs:
            try:
                built.extend(f"{order.directory.name}/e{e}" for e in order.ensure(epochs))
            except OSError as err:
                logger.warning("cannot write the shuffle cache %s (%s); missing epochs will be computed in memory "
                               "on each rank", order.directory, err)

    if env.is_rank0:
        build_here()
    env.barrier()
    sees_all = all(not order.missing(epochs) for order, epochs in needs)
    if not env.all_true(sees_all):
        if env.local_rank == 0 and not sees_all:
            logger.info("[rank %d] the shuffle cache built by rank 0 is not visible here (node-local cache?); "
                        "building it for this node", env.rank)
            build_here()
        env.barrier()
        absent = {str(order.directory): order.missing(epochs) for order, epochs in needs}
        absent = {d: e for d, e in absent.items() if e}
        if absent:
            logger.warning("[rank %d] shuffle cache still lacks epochs %s; they will be computed in memory",
                           env.rank, absent)
    seconds = time.perf_counter() - started
    if env.is_rank0:
        where = ", ".join(sorted({str(order.directory) for order, _ in needs}))
        if built:
            logger.info("built %d shuffle epoch(s) in %.2f s: %s under %s", len(built), seconds,
                        ", ".join(built), where)
        else:
            logger.info("shuffle cache used as is (%d epoch(s), checked in %.2f s): %s",
                        sum(epochs for _, epochs in needs), seconds, where)
