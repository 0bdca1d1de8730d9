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
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from types import TracebackType

import numpy as np

from trainrun.config.errors import ConfigError

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

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
        self._bin_path = data_file_path(path_prefix)
        self._idx_path = index_file_path(path_prefix)
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + f".tmp-{os.getpid()}")
        self._idx_tmp = self._idx_path.with_name(self._idx_path.name + f".tmp-{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - stays open across add_document() calls; close() closes it
        self._sizes: list[int] = []
        self.num_tokens = 0
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
    """Read-only, memory-mapped view of a ``.bin``/``.idx`` pair; item ``i`` is document ``i``."""

    def __init__(self, path_prefix: str | os.PathLike, field: str = "data.path"):
        self.path_prefix = Path(path_prefix)
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise ConfigError(field, str(self.path_prefix),
                                  f"{p} does not exist; point {field} at a directory written by "
                                  "`trainrun-prepare` (or Megatron's preprocess_data.py)")
        raw = idx_path.read_bytes()
        if len(raw) < HEADER_SIZE or raw[: len(MAGIC)] != MAGIC:
            raise ConfigError(field, str(idx_path), "not a Megatron MMap index (bad magic bytes); "
                              "rebuild it with `trainrun-prepare`")
        (version,) = struct.unpack_from("<Q", raw, 9)
        if version != VERSION:
            raise ConfigError(field, str(idx_path), f"index version {version} is unsupported (expected "
                              f"{VERSION}); rebuild it with `trainrun-prepare`")
        (code,) = struct.unpack_from("<B", raw, 17)
        if code not in DTYPE_CODES:
            raise ConfigError(field, str(idx_path), f"unknown dtype code {code}; rebuild it with `trainrun-prepare`")
        self.dtype = np.dtype(DTYPE_CODES[code])
        seq_count, doc_count = struct.unpack_from("<QQ", raw, 18)
        expected = HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
        if len(raw) != expected:
            raise ConfigError(field, str(idx_path), f"index is {len(raw)} bytes, its header implies "
                              f"{expected} (truncated or corrupt); rebuild it with `trainrun-prepare`")
        # Copies of the small index arrays: the bytes object owns them, no mmap to keep open.
        off = HEADER_SIZE
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=seq_count, offset=off)
        off += 4 * seq_count
        self.pointers = np.frombuffer(raw, dtype=np.int64, count=seq_count, offset=off)
        off += 8 * seq_count
        self.doc_idx = np.frombuffer(raw, dtype=np.int64, count=doc_count, offset=off)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))

        bin_bytes = bin_path.stat().st_size
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if seq_count else 0
        if bin_bytes < end:
            raise ConfigError(field, str(bin_path), f"data file is {bin_bytes} bytes but the index needs "
                              f"{end} (truncated); rebuild it with `trainrun-prepare`")
        # np.memmap cannot map an empty file; an empty split is still a valid (empty) dataset.
        if bin_bytes >= self.dtype.itemsize:
            self.tokens: np.ndarray = np.memmap(bin_path, dtype=self.dtype, mode="r",
                                                shape=(bin_bytes // self.dtype.itemsize,))
        else:
            self.tokens = np.empty(0, dtype=self.dtype)

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
        if len(self) == 0:
            return True
        expected = np.zeros(len(self), dtype=np.int64)
        np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        return bool(np.array_equal(expected, self.pointers))

    def __repr__(self) -> str:
        return (f"IndexedDataset({str(self.path_prefix)!r}, documents={len(self)}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")
