"""The dataset directory: what the bundled corpus and ``trainrun-prepare`` both write.

::

    <dir>/train.bin, train.idx   Megatron indexed dataset of the training documents
    <dir>/val.bin,   val.idx     ... of the validation documents
    <dir>/meta.json              {"tokenizer": "byte"|"bpe", "vocab_size", "eod_id", "dtype",
                                  "num_documents": {"train", "val"}, "num_tokens": {"train", "val"},
                                  "max_token_id": {"train", "val"},
                                  "checksum", "source", "format_version"}
    <dir>/tokenizer.json         HuggingFace tokenizer (bpe only)

Every stored document ends with the EOD token. ``checksum`` is the sha256 of train.bin, val.bin,
train.idx and val.idx, in that order, so it identifies the exact token data a run trained on.
``max_token_id`` (the largest id in each split, null for an empty one) lets opening check the
tokens against ``vocab_size`` without reading them (see :mod:`trainrun.data.checks`); directories
written before it existed lack it and still open.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from trainrun.data.indexed import (
    DataFileError,
    IndexedDatasetWriter,
    data_file_path,
    index_file_path,
    token_dtype,
)
from trainrun.data.tokenizer import TOKENIZER_FILE, BPETokenizer, Tokenizer
from trainrun.errors import ConfigError, DataError

SPLITS = ("train", "val")
META_FILE = "meta.json"
FORMAT_VERSION = 1


def split_prefix(directory: str | os.PathLike, split: str) -> Path:
    """Path prefix of one split's ``.bin``/``.idx`` pair."""
    return Path(directory) / split


def checksum_files(directory: str | os.PathLike) -> list[Path]:
    """The files covered by the checksum, in hashing order."""
    prefixes = [split_prefix(directory, s) for s in SPLITS]
    return [data_file_path(p) for p in prefixes] + [index_file_path(p) for p in prefixes]


def compute_checksum(directory: str | os.PathLike) -> str:
    """sha256 hex digest of the token data (train.bin, val.bin, train.idx, val.idx)."""
    h = hashlib.sha256()
    for path in checksum_files(directory):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def read_meta(directory: str | os.PathLike, field: str = "data.path") -> dict[str, Any]:
    """Parse ``meta.json``; a missing or malformed one is a DataError naming ``field`` (no directory: a ConfigError)."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise ConfigError(field, str(directory), "no such directory; run `trainrun-prepare INPUTS --output DIR` "
                          "first and set data.path=DIR")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(field, str(directory), f"{path.name} is missing, so this is not a dataset directory; "
                          "run `trainrun-prepare INPUTS --output DIR` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(field, str(directory),
                        f"{path.name} is not valid JSON ({err}); rerun `trainrun-prepare`") from None
    if not isinstance(meta, dict):
        raise DataFileError(path, f"holds a JSON {type(meta).__name__}, not an object", field=field)
    missing = [k for k in ("tokenizer", "vocab_size", "eod_id", "checksum") if k not in meta]
    if missing:
        raise DataError(field, str(directory), f"{path.name} lacks {', '.join(missing)}; rerun `trainrun-prepare`")
    _check_meta_values(path, meta, field)
    return meta


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta_values(path: Path, meta: dict[str, Any], field: str) -> None:
    """Types and ranges of the fields training relies on (a hand-edited meta.json is the usual cause)."""
    vocab, eod = meta["vocab_size"], meta["eod_id"]
    if not _is_int(vocab) or vocab < 1:
        raise DataFileError(path, f"has vocab_size {vocab!r}, not a positive integer", field=field)
    if not _is_int(eod) or not 0 <= eod < vocab:
        raise DataFileError(path, f"has eod_id {eod!r}, not an integer in [0, vocab_size={vocab})", field=field)
    recorded = meta.get("max_token_id")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(v is None or _is_int(v) for v in recorded.values()):
        raise DataFileError(path, f"has max_token_id {recorded!r}; expected {{split: integer or null}}", field=field)


class DatasetDirWriter:
    """Write the train and val splits of a dataset directory, then its ``meta.json``.

    Use it on a staging directory (see :mod:`trainrun.data.fsutil`): a directory only becomes a
    dataset once it is renamed into place after :meth:`finish`.
    """

    def __init__(self, directory: str | os.PathLike, tokenizer: Tokenizer, tokenizer_name: str):
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._eod = np.asarray([tokenizer.eod_id], dtype=self.dtype)
        self._writers = {s: IndexedDatasetWriter(split_prefix(directory, s), self.dtype) for s in SPLITS}

    def add(self, split: str, tokens: np.ndarray | list[int]) -> None:
        """Store one document (without EOD: it is appended here) in ``split``."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._writers[split].add_document(np.concatenate([arr, self._eod]))

    def count(self, split: str) -> int:
        """Documents written to ``split`` so far."""
        return len(self._writers[split])

    def finish(self, source: str) -> dict[str, Any]:
        """Close both splits, write the tokenizer (bpe) and ``meta.json``; returns the metadata."""
        for w in self._writers.values():
            w.close()
        if isinstance(self.tokenizer, BPETokenizer):
            self.tokenizer.save(self.directory / TOKENIZER_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": self.tokenizer_name,
            "vocab_size": int(self.tokenizer.vocab_size),
            "eod_id": int(self.tokenizer.eod_id),
            "dtype": str(self.dtype),
            "num_documents": {s: len(w) for s, w in self._writers.items()},
            "num_tokens": {s: w.num_tokens for s, w in self._writers.items()},
            "max_token_id": {s: w.max_token_id for s, w in self._writers.items()},
            "checksum": compute_checksum(self.directory),
            "source": source,
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    def abort(self) -> None:
        """Discard partially written splits."""
        for w in self._writers.values():
            w.abort()

    def __enter__(self) -> DatasetDirWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
