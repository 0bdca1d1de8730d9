"""Checks of a dataset directory's splits against its ``meta.json``, run once when it is opened.

Token ids against the vocabulary
--------------------------------
An id at or above the model's vocabulary size only fails on a GPU, steps into the run, as an
opaque "device-side assert triggered". The check here is exact and costs (almost) nothing:

* ``trainrun-prepare`` and the bundled corpus record each split's largest id in ``meta.json``
  (``max_token_id``); the writer sees every token anyway, so this is free. Opening requires
  ``max_token_id < vocab_size`` without reading a token, and the orchestrator already requires
  ``model.vocab_size >= vocab_size`` (``resolve_vocab``), so every id indexes an embedding row.
* A split whose ``.bin`` is at most :data:`SCAN_MAX_BYTES` is also scanned whole, in chunks, at
  open (about 40 ms per GiB from the page cache), by file reads into one buffer rather than through
  the memory map, so the scanned pages do not stay in the process's resident memory (see
  :mod:`trainrun.data.indexed`). That catches a ``.bin`` replaced or edited after
  preparation with its size unchanged, and confirms the recorded maximum.
* A bigger split is scanned only when nothing recorded its maximum (a directory written before
  ``max_token_id`` existed, or hand-assembled from Megatron's files; a warning says re-running
  ``trainrun-prepare`` makes this instant) or when ``verify_checksum`` asks to read everything.
  Otherwise the recorded maximum is trusted, as Megatron trusts its index; ``meta.json``'s checksum
  covers the token files, and ``verify_checksum`` re-hashes and re-scans them.

Why at open and not per sample in the loader: a per-window ``max`` would also be exact, but it
fails at step N on whichever rank drew the bad window; checking at open fails before the model is
built, on every rank alike, with one line naming the file.

Also checked, from the index alone: the ``.idx`` dtype and the document and token counts against
``meta.json`` (files from different preparations), and back-to-back storage (the loader reads a
split as one token stream).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from trainrun.data.indexed import DataFileError, IndexedDataset
from trainrun.data.layout import META_FILE

logger = logging.getLogger(__name__)

SCAN_MAX_BYTES = 1 << 30  # a .bin up to this size is scanned whole at open: ~0.05 s warm, a few s cold


def check_split(directory: Path, split: str, ds: IndexedDataset, meta: dict[str, Any],
                full_scan: bool = False) -> int | None:
    """Check one opened split against ``meta``; returns its largest token id (None when empty).

    Raises :class:`DataFileError` naming the file at fault. ``full_scan`` reads every token
    whatever the file size.
    """
    meta_path = directory / META_FILE
    _check_counts(meta_path, split, ds, meta)
    if not ds.is_contiguous():
        raise DataFileError(ds.idx_path, f"sequence {ds.gap_at} does not start where the one before it ends, "
                            "but training reads each split as one back-to-back token stream")
    vocab = int(meta["vocab_size"])
    recorded = (meta.get("max_token_id") or {}).get(split, "missing")
    if recorded not in ("missing", None) and recorded >= vocab:
        raise DataFileError(meta_path, f"records max_token_id {recorded} for the {split} split, not below its "
                            f"vocab_size {vocab}: the tokens come from a larger vocabulary than the tokenizer's")
    size = ds.tokens.nbytes
    if not (full_scan or size <= SCAN_MAX_BYTES or recorded == "missing"):
        return recorded
    if size > SCAN_MAX_BYTES and not full_scan:
        logger.warning("%s records no max_token_id for %s; scanning all %d tokens of %s against vocab_size %d "
                       "(re-run trainrun-prepare to record it and skip this)", meta_path, split, ds.num_tokens,
                       ds.bin_path, vocab)
    started = time.perf_counter()
    span = ds.token_range()
    logger.debug("scanned %s in %.3f s: ids %s", ds.bin_path, time.perf_counter() - started, span)
    if span is not None and (span[0] < 0 or span[1] >= vocab):
        _raise_token_outside(ds, vocab)
    top = None if span is None else span[1]
    if recorded != "missing" and recorded != top:
        raise DataFileError(ds.bin_path, f"holds token ids up to {top} but {META_FILE} records max_token_id "
                            f"{recorded}: the file changed after preparation")
    return top


def _check_counts(meta_path: Path, split: str, ds: IndexedDataset, meta: dict[str, Any]) -> None:
    """The ``.idx`` must describe what ``meta.json`` says was written (same dtype, documents, tokens)."""
    dtype = meta.get("dtype")
    if dtype is not None and str(dtype) != str(ds.dtype):
        raise DataFileError(ds.idx_path, f"stores {ds.dtype} tokens but {META_FILE} says {dtype}: the files come "
                            "from different preparations")
    for key, actual in (("num_documents", len(ds)), ("num_tokens", ds.num_tokens)):
        expected = (meta.get(key) or {}).get(split)
        if expected is not None and int(expected) != actual:
            raise DataFileError(ds.idx_path, f"holds {actual} {key[4:]} but {META_FILE} records {expected} for the "
                                f"{split} split: the files come from different preparations")


def _raise_token_outside(ds: IndexedDataset, vocab: int) -> None:
    """Raise for the first token of ``ds`` outside ``[0, vocab)``, naming where it is."""
    found = ds.first_token_outside(vocab)
    if found is None:  # token_range() saw one, so only a file changing under us gets here
        raise DataFileError(ds.bin_path, f"changed while it was being checked against vocab_size {vocab}")
    position, token = found
    what = "negative" if token < 0 else f"not below the vocab_size {vocab} in {META_FILE}"
    raise DataFileError(ds.bin_path, f"token {token} at position {position} (document {ds.document_at(position)}) "
                        f"is {what}, so the embedding lookup would fail (on a GPU as a device-side assert); "
                        "the data was tokenized with another tokenizer, or is corrupt")
