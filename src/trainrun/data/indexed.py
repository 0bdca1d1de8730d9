"""Megatron-LM's indexed dataset (MMap format): token documents in a ``.bin`` + ``.idx`` pair.

The byte layout is exactly that of Megatron-LM's ``megatron/core/datasets/indexed_dataset.py``,
so files written here load in Megatron and vice versa. All integers are little-endian.

``<prefix>.idx``::

    offset  size                 field
    0       9                    magic  b"MMIDIDX\\x00\\x00"
    9       8   <Q               version, always 1
    17      1   <B               dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                 6 float64, 7 float32, 8 uint16)
    18      8   <Q               sequence count S
    26      8   <Q               document count D (number of entries in doc_idx)
    34      4*S int32[S]         sizes: tokens per sequence
    ..      8*S int64[S]         pointers: byte offset of each sequence in .bin
    ..      8*D int64[D]         doc_idx: sequence index where each document starts, followed by
                                 the end; it begins with 0 and has one entry per document end,
                                 so D = number of documents + 1

``<prefix>.bin`` is the sequences' tokens back to back in the dtype above, with no header and no
padding, so sequence ``i`` is ``sizes[i]`` items at byte ``pointers[i]``.

Here every document is a single sequence (``doc_idx == arange(S + 1)``), which is what Megatron's
preprocessing writes without sentence splitting.

Reading: checked, not trusted, and never copied
-----------------------------------------------
:class:`IndexedDataset` maps the ``.idx`` with :mod:`mmap` and views its three arrays with
``np.frombuffer`` (as Megatron's ``_IndexReader`` does), and maps the ``.bin`` with ``np.memmap``.
Nothing is read into private memory, so the 8 ranks of a node share one page-cache copy of each
file instead of holding 8 heap copies of ``sizes``/``pointers``/``doc_idx``.

Opening checks everything that would otherwise fail later, and far from its cause: the header
(magic, version, an integer dtype: float codes 6 and 7 are refused), that the counts fill the
``.idx`` exactly, ``doc_idx`` (starts at 0, never decreases, ends at S), every size and pointer
(non-negative, aligned, inside the ``.bin``) and that the ``.bin`` is exactly as long as the index
describes. That is one vectorised pass over the mapped index in fixed-size chunks (constant
memory; about 10 ms per million documents), not over the tokens. Each failure is a
:class:`DataFileError`: one line naming the file, what is wrong and how to fix it, which the CLIs
report with exit status 2. Token ids are checked against the vocabulary by
:mod:`trainrun.data.checks`, which uses :meth:`IndexedDataset.first_token_outside`.

Resident memory does not grow with the dataset: the open-time pass over the ``.idx`` hands each
checked chunk's pages back (``madvise(MADV_DONTNEED)``: they leave this process, not the page
cache), and the token scans (:meth:`IndexedDataset.token_range`,
:meth:`IndexedDataset.first_token_outside`) read the ``.bin`` with file reads into one reusable
buffer instead of faulting in the mapping. After opening, a process holds only the index and token
pages that training touches.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np

from trainrun.errors import DataError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
CHECK_CHUNK = 1 << 20  # index entries per vectorised step of the open-time checks: bounded temporaries
SCAN_CHUNK = 1 << 24  # tokens per step of a token scan (32 MiB of uint16)
MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)  # None where the platform lacks madvise
REBUILD_HINT = "rebuild the dataset: re-run `trainrun-prepare INPUTS --output DIR --force`"

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE: dict[np.dtype, int] = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype | type | str) -> int:
    """Megatron's code for ``dtype``; raises ValueError for a type the format cannot store."""
    try:
        return CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not storable in an indexed dataset; use one of "
                         f"{sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}") from None


class DataFileError(DataError):
    """A dataset file that is missing, corrupt or inconsistent: one line naming the file, the problem and the fix.

    A :class:`~trainrun.errors.DataError` (field ``data.path``), so ``python -m trainrun`` reports it
    as a data error with exit status 2 and no traceback.
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = REBUILD_HINT, field: str = "data.path"):
        super().__init__(field, os.fspath(path), f"{problem}; {fix}")
        self.path = Path(path)
        self.problem = problem


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype for ``vocab_size`` (Megatron's rule: uint16 below 65500, else int32)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def data_file_path(path_prefix: str | os.PathLike) -> Path:
    """The ``.bin`` file of a dataset prefix."""
    return Path(f"{os.fspath(path_prefix)}.bin")


def index_file_path(path_prefix: str | os.PathLike) -> Path:
    """The ``.idx`` file of a dataset prefix."""
    return Path(f"{os.fspath(path_prefix)}.idx")


class IndexedDatasetWriter:
    """Write documents to ``<prefix>.bin`` (streamed) and ``<prefix>.idx`` (at close).

    Both files are written under temporary names and renamed into place only after a clean close,
    so a crash never leaves a half-written dataset behind (the ``.idx`` is renamed last: a
    reader never sees an index without its data).
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype: np.dtype | type | str):
        self.path_prefix = Path(path_prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if not np.issubdtype(self.dtype, np.integer):
            raise ValueError(f"token ids are integers; a {self.dtype} indexed dataset would not load for training")
        self._bin_path = data_file_path(path_prefix)
        self._idx_path = index_file_path(path_prefix)
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + f".tmp-{os.getpid()}")
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + f".tmp-{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - stays open across add_document() calls; close() closes it
        self._sizes: list[int] = []
        self.num_tokens = 0
        self.max_token_id: int | None = None  # None until a token is written; recorded in meta.json
        self._closed = False

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document (a 1-D token array) as one sequence."""
        if self._closed:
            raise RuntimeError("add_document() after close()")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D token array, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            # Refuse silent wrap-around (e.g. token 70000 into uint16): it would corrupt the data.
            if arr.size and np.issubdtype(arr.dtype, np.integer) and np.issubdtype(self.dtype, np.integer):
                info = np.iinfo(self.dtype)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(f"token ids outside the range of {self.dtype} "
                                     f"[{info.min}, {info.max}]: min {arr.min()}, max {arr.max()}")
            arr = arr.astype(self.dtype)
        if arr.size:
            if np.issubdtype(self.dtype, np.signedinteger) and arr.min() < 0:
                raise ValueError(f"negative token id {arr.min()}: token ids index the embedding table")
            top = int(arr.max())
            self.max_token_id = top if self.max_token_id is None else max(self.max_token_id, top)
        self._bin.write(np.ascontiguousarray(arr).tobytes(order="C"))
        self._sizes.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def __len__(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Finish the ``.bin``, write the ``.idx`` and move both into place."""
        if self._closed:
            return
        self._closed = True
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", self._code))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self._bin_path)
        os.replace(self._idx_tmp, self._idx_path)
        logger.debug("wrote %s: %d documents, %d tokens", self.path_prefix, len(sizes), self.num_tokens)

    def abort(self) -> None:
        """Drop everything written so far (used when an exception interrupts writing)."""
        self._closed = True
        self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of a ``.bin``/``.idx`` pair; item ``i`` is document ``i``.

    Opening validates the pair (see the module docstring) and raises :class:`DataFileError`,
    naming the bad file and ``field``, before anything reads a token.
    """

    def __init__(self, path_prefix: str | os.PathLike, field: str = "data.path"):
        self.path_prefix = Path(path_prefix)
        self.field = field
        self.idx_path, self.bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise DataFileError(p, "does not exist", f"point {field} at a directory written by "
                                    "`trainrun-prepare` (or Megatron's preprocess_data.py)", field)
        seq_count, doc_count = self._map_index()
        off = HEADER_SIZE
        # Views into the shared mapping, not copies: see the module docstring.
        self.sizes: np.ndarray = np.frombuffer(self._idx_map, dtype="<i4", count=seq_count, offset=off)
        off += 4 * seq_count
        self.pointers: np.ndarray = np.frombuffer(self._idx_map, dtype="<i8", count=seq_count, offset=off)
        off += 8 * seq_count
        self.doc_idx: np.ndarray = np.frombuffer(self._idx_map, dtype="<i8", count=doc_count, offset=off)
        self._check_doc_idx()
        bin_bytes = self.bin_path.stat().st_size
        self.num_tokens, end = self._check_sequences()
        if end != bin_bytes:
            what = ("truncated" if bin_bytes < end
                    else f"{bin_bytes - end} bytes more than the index accounts for")
            raise DataFileError(self.bin_path, f"is {bin_bytes} bytes but {self.idx_path.name} describes {end} "
                                f"bytes of tokens ({what}), so the two files do not belong together", field=field)
        # np.memmap cannot map an empty file; an empty split is still a valid (empty) dataset.
        if bin_bytes >= self.dtype.itemsize:
            self.tokens: np.ndarray = np.memmap(self.bin_path, dtype=self.dtype, mode="r",
                                                shape=(bin_bytes // self.dtype.itemsize,))
        else:
            self.tokens = np.empty(0, dtype=self.dtype)

    def _idx_error(self, problem: str) -> DataFileError:
        return DataFileError(self.idx_path, problem, field=self.field)

    def _map_index(self) -> tuple[int, int]:
        """Map the ``.idx`` read-only and check its header; returns (sequence count, doc_idx entries)."""
        with open(self.idx_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_SIZE:
                raise self._idx_error(f"is {size} bytes, shorter than the {HEADER_SIZE}-byte header of a Megatron "
                                      "MMap index (truncated, or not an index)")
            # The mapping outlives the file object; every array below is a view into it.
            self._idx_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._idx_map
        if mm[: len(MAGIC)] != MAGIC:
            raise self._idx_error("is not a Megatron MMap index (bad magic bytes)")
        (version,) = struct.unpack_from("<Q", mm, 9)
        if version != VERSION:
            raise self._idx_error(f"has index version {version}, but only version {VERSION} is supported")
        (code,) = struct.unpack_from("<B", mm, 17)
        if code not in DTYPE_CODES:
            raise self._idx_error(f"has unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        if not np.issubdtype(self.dtype, np.integer):
            raise self._idx_error(f"has dtype code {code} ({self.dtype}), but token ids must be stored as an "
                                  "integer type (codes 1-5 or 8)")
        seq_count, doc_count = struct.unpack_from("<QQ", mm, 18)
        expected = HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
        if size != expected:
            raise self._idx_error(f"is {size} bytes but its header's counts ({seq_count} sequences, {doc_count} "
                                  f"doc_idx entries) need {expected} (truncated, or corrupt counts)")
        return seq_count, doc_count

    def _check_doc_idx(self) -> None:
        """doc_idx starts at 0, never decreases and ends at the sequence count (Megatron's invariant)."""
        d, n = self.doc_idx, len(self.sizes)
        if len(d) == 0 or d[0] != 0 or d[-1] != n:
            span = f"runs from {d[0]} to {d[-1]}" if len(d) else "is empty"
            raise self._idx_error(f"doc_idx {span}, expected it to run from 0 to {n} (the sequence count)")
        for start in range(0, len(d) - 1, CHECK_CHUNK):
            down = np.flatnonzero(np.diff(d[start : start + CHECK_CHUNK + 1]) < 0)
            if down.size:
                i = start + int(down[0])
                raise self._idx_error(f"doc_idx decreases at entry {i + 1} ({d[i]} -> {d[i + 1]})")
            self._release(d[start : start + CHECK_CHUNK + 1])

    def _check_sequences(self) -> tuple[int, int]:
        """One chunked pass over sizes and pointers; returns (tokens, end of the last sequence in bytes).

        Also finds the first sequence that does not start right where the previous one ended
        (:attr:`gap_at`), so :meth:`is_contiguous` costs nothing later.
        """
        item = self.dtype.itemsize
        tokens = end = 0
        self.gap_at: int | None = None
        for start in range(0, len(self.sizes), CHECK_CHUNK):
            sizes = self.sizes[start : start + CHECK_CHUNK].astype(np.int64)
            ptrs = self.pointers[start : start + CHECK_CHUNK]
            bad = np.flatnonzero(sizes < 0)
            if bad.size:
                raise self._idx_error(f"sequence {start + int(bad[0])} has negative size {sizes[bad[0]]}")
            # The bound keeps ptrs + sizes * item far from int64 overflow; no real .bin is 4 EiB.
            bad = np.flatnonzero((ptrs < 0) | (ptrs % item != 0) | (ptrs > 1 << 62))
            if bad.size:
                i = int(bad[0])
                raise self._idx_error(f"sequence {start + i} starts at byte {ptrs[i]}, which is not a "
                                      f"non-negative multiple of the {item}-byte token size")
            if self.gap_at is None:
                expected = (tokens + np.cumsum(sizes) - sizes) * item  # where back-to-back storage puts them
                off = np.flatnonzero(expected != ptrs)
                if off.size:
                    self.gap_at = start + int(off[0])
            tokens += int(sizes.sum())
            end = max(end, int((ptrs + sizes * item).max()))
            self._release(self.sizes[start : start + CHECK_CHUNK])
            self._release(ptrs)
        return tokens, end

    def _release(self, view: np.ndarray) -> None:
        """Drop the pages of ``view`` (a slice of the mapped ``.idx``) from this process's resident set.

        A read-only file mapping re-reads them from the page cache if touched again, so this only keeps
        the open-time checks from leaving ~20 bytes per document resident in every rank.
        """
        if MADV_DONTNEED is None or view.nbytes == 0:
            return
        base = np.frombuffer(self._idx_map, dtype=np.uint8).ctypes.data
        start = view.ctypes.data - base
        aligned = start - start % mmap.PAGESIZE  # madvise needs a page-aligned start
        self._idx_map.madvise(MADV_DONTNEED, aligned, start - aligned + view.nbytes)

    def __reduce__(self):
        # Pickle by path (e.g. to spawned loader workers): re-mapping beats copying the arrays.
        return type(self), (self.path_prefix, self.field)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` (a read-only view into the memory map)."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (all the rest when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"span [{offset}, {offset + length}) outside document {i} of {size} tokens")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def is_contiguous(self) -> bool:
        """Whether the sequences lie back to back from byte 0 (so the .bin is one token stream)."""
        return self.gap_at is None

    def _scan_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first position, tokens)`` of the whole ``.bin`` in chunks of :data:`SCAN_CHUNK`, by file reads.

        Reads, not the mapping: scanning through ``tokens`` would leave every page of the file in this
        process's resident set. The chunk is one reused buffer, valid until the next one.
        """
        total = len(self.tokens)
        if total == 0:
            return
        buffer = np.empty(min(SCAN_CHUNK, total), dtype=self.dtype)
        with open(self.bin_path, "rb", buffering=0) as f:
            for start in range(0, total, SCAN_CHUNK):
                chunk = buffer[: min(SCAN_CHUNK, total - start)]
                view, got = memoryview(chunk).cast("B"), 0
                while got < chunk.nbytes:  # readinto may return less than asked (signals, network file systems)
                    n = f.readinto(view[got:])
                    if not n:
                        raise DataFileError(self.bin_path, f"ended after {start * self.dtype.itemsize + got} "
                                            "bytes while being scanned (truncated while open?)", field=self.field)
                    got += n
                yield start, chunk

    def token_range(self) -> tuple[int, int] | None:
        """``(min, max)`` token id of the whole ``.bin`` (None when empty); reads every token, in chunks."""
        lo = hi = None
        for _, chunk in self._scan_chunks():
            c_lo, c_hi = int(chunk.min()), int(chunk.max())
            lo, hi = (c_lo, c_hi) if lo is None else (min(lo, c_lo), max(hi, c_hi))
        return None if lo is None else (lo, hi)

    def first_token_outside(self, high: int) -> tuple[int, int] | None:
        """``(position, id)`` of the first token of the ``.bin`` not in ``[0, high)``; None when all are."""
        for start, chunk in self._scan_chunks():
            bad = np.flatnonzero((chunk < 0) | (chunk >= high))
            if bad.size:
                return start + int(bad[0]), int(chunk[bad[0]])
        return None

    def document_at(self, position: int) -> int:
        """Index of the document holding token ``position`` of the ``.bin`` (contiguous datasets only)."""
        # side="right": empty documents share their pointer with the next one, which owns the token.
        return int(np.searchsorted(self.pointers, position * self.dtype.itemsize, side="right")) - 1

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.path_prefix)!r}, documents={len(self)}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")
