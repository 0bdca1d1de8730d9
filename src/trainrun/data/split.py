"""Deterministic train/validation split by document, independent of document order and content."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def document_scores(keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """A stable pseudo-random score in [0, 1) per document key (sha256, not Python's salted hash)."""
    scores = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
        scores[i] = int.from_bytes(digest[:8], "little") / 2.0**64
    return scores


def validation_mask(scores: np.ndarray, val_fraction: float, has_text: np.ndarray | None = None) -> np.ndarray:
    """Documents whose score is below ``val_fraction`` go to validation.

    With at least two documents and ``val_fraction > 0`` both splits are kept non-empty (the
    lowest/highest scoring document is moved), so small inputs still give a usable split.
    ``has_text`` (bool per document) restricts that guarantee to documents that are stored: an
    empty document is never written, so the document moved must be one with text, and a split
    whose only documents are empty counts as empty.
    """
    mask = scores < val_fraction
    stored = np.ones(len(scores), dtype=bool) if has_text is None else np.asarray(has_text, dtype=bool)
    if int(stored.sum()) >= 2 and val_fraction > 0:
        # Only stored documents compete; inf/-inf keep the others out of argmin/argmax.
        if not (mask & stored).any():
            mask[int(np.argmin(np.where(stored, scores, np.inf)))] = True
        if not (~mask & stored).any():
            mask[int(np.argmax(np.where(stored, scores, -np.inf)))] = False
    return mask
