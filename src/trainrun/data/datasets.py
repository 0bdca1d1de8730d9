"""Opening a dataset directory, and the ``stdlib`` / ``indexed`` entries of the dataset registry."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trainrun.config.schema import DataConfig
from trainrun.data.checks import check_split
from trainrun.data.corpus import build_stdlib_corpus, cache_dirs
from trainrun.data.indexed import IndexedDataset, data_file_path, index_file_path
from trainrun.data.layout import (
    META_FILE,
    SPLITS,
    compute_checksum,
    read_meta,
    split_prefix,
)
from trainrun.data.tokenizer import Tokenizer, load_tokenizer
from trainrun.errors import ConfigError, DataError
from trainrun.registry import DATASETS

logger = logging.getLogger(__name__)

PREPARE_HINT = "run `trainrun-prepare INPUTS --output DIR` first and set data.path=DIR"


@dataclass
class TokenDataset:
    """A tokenized dataset ready for the loader: both splits, the tokenizer and its identity."""

    train: IndexedDataset
    val: IndexedDataset
    tokenizer: Tokenizer
    vocab_size: int
    eod_id: int
    checksum: str
    path: Path
    max_token_id: int = -1
    """Largest token id in either split (-1: no tokens); opening checked it is below ``vocab_size``."""


def open_dataset_dir(path: str | os.PathLike, verify_checksum: bool = False,
                     field: str = "data.path") -> TokenDataset:
    """Open and check a dataset directory (see :mod:`trainrun.data.layout`); memory-maps its splits.

    Every check of :mod:`trainrun.data.checks` runs here, so a bad directory raises a
    :class:`~trainrun.errors.DataError` naming the file before training starts; tokens are read only for small
    splits or when nothing recorded their maximum id. ``verify_checksum`` re-hashes and scans
    every file (reads them all) and fails on a mismatch.
    """
    directory = Path(path).expanduser()
    meta = read_meta(directory, field)
    train, val = (IndexedDataset(split_prefix(directory, s), field) for s in SPLITS)
    tops = [check_split(directory, s, ds, meta, full_scan=verify_checksum)
            for s, ds in zip(SPLITS, (train, val), strict=True)]
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size != meta["vocab_size"] or tokenizer.eod_id != meta["eod_id"]:
        raise DataError(field, str(directory), "meta.json and the tokenizer disagree on vocab_size/eod_id; "
                        "rerun `trainrun-prepare`")
    if verify_checksum:
        actual = compute_checksum(directory)
        if actual != meta["checksum"]:
            raise DataError(field, str(directory), f"checksum mismatch (meta.json {meta['checksum'][:12]}, files "
                            f"{actual[:12]}): the data changed after preparation; rerun `trainrun-prepare`")
    return TokenDataset(train=train, val=val, tokenizer=tokenizer, vocab_size=int(meta["vocab_size"]),
                        eod_id=int(meta["eod_id"]), checksum=str(meta["checksum"]), path=directory,
                        max_token_id=max((t for t in tops if t is not None), default=-1))


def check_indexed_config(cfg: DataConfig) -> None:
    """The cheap check validation runs before anything is built: a complete dataset directory."""
    read_meta(_check_indexed_path(cfg.path))


def _check_indexed_path(path: str | None) -> Path:
    if path is None or str(path).strip() == "":
        raise ConfigError("data.path", path, f"data.name=indexed needs a dataset directory; {PREPARE_HINT}")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ConfigError("data.path", path, f"no such directory; {PREPARE_HINT}")
    wanted = [directory / META_FILE]
    for s in SPLITS:
        wanted += [data_file_path(split_prefix(directory, s)), index_file_path(split_prefix(directory, s))]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        raise DataError("data.path", path, f"missing {', '.join(missing)}, so this is not a complete dataset "
                        f"directory; {PREPARE_HINT}")
    return directory


@DATASETS.register("stdlib", writes=cache_dirs)
def build_stdlib(cfg: DataConfig) -> TokenDataset:
    """The bundled standard-library corpus (byte tokens), built once into the cache."""
    subset = str(getattr(cfg.subset, "value", cfg.subset))
    return open_dataset_dir(build_stdlib_corpus(cfg.path, cfg.val_fraction, cfg.max_documents, subset=subset))


@DATASETS.register("indexed", check=check_indexed_config)
def build_indexed(cfg: DataConfig) -> TokenDataset:
    """A dataset directory written by ``trainrun-prepare`` at ``data.path``."""
    return open_dataset_dir(_check_indexed_path(cfg.path))
