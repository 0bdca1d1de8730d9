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


def validation_mask(scores: np.ndarray, val_fraction: float) -> np.ndarray:
    """Documents whose score is below ``val_fraction`` go to validation.

    With at least two documents and ``val_fraction > 0`` both splits are kept non-empty (the
    lowest/highest scoring document is moved), so small inputs still give a usable split.
    """
    mask = scores < val_fraction
    if len(scores) >= 2 and val_fraction > 0:
        if not mask.any():
            mask[int(np.argmin(scores))] = True
        if mask.all():
            mask[int(np.argmax(scores))] = False
    return mask
