"""Checkpoints written before q/k/v were fused into ``attention.wqkv``: recognised, and read as the fused layout.

Such a checkpoint holds each block's ``attention.wq``/``wk``/``wv`` (weights, biases, and their optimizer
state) where the model now has one ``attention.wqkv`` in Megatron's head-interleaved layout
(:mod:`trainrun.model.qkv`). A persistent (DCP) checkpoint resumes: every rank reads the three full
tensors of an entry, fuses them and keeps its piece, one entry at a time; the next save writes the fused
layout. A node-local one (per-rank files, replaced at the next save) is refused with one line.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trainrun.errors import CheckpointMismatch
from trainrun.model.qkv import fuse_qkv

PARTS = (".attention.wq.", ".attention.wk.", ".attention.wv.")
"""Name parts of the separate projections, in the order ``fuse_qkv`` takes them."""
FUSED = ".attention.wqkv."


class SeparateQkvCheckpoint(CheckpointMismatch):
    """A checkpoint in the separate wq/wk/wv layout that cannot be read here; the message names what to do."""


def has_separate_qkv(names: Iterable[str]) -> bool:
    """Whether entry ``names`` are those of a checkpoint written before the fusion."""
    return any(PARTS[0] in name for name in names)


def separate_sources(fused_key: str) -> tuple[str, str, str]:
    """The three entries (wq, wk, wv) an ``attention.wqkv`` entry (weight, bias or their optimizer state) is made of."""
    return tuple(fused_key.replace(FUSED, part) for part in PARTS)  # type: ignore[return-value]


def fuse_values(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """The fused entry of three separate ones: rows interleaved by kv group; a scalar (an optimizer's
    ``step``, the same for all three) is taken once."""
    if q.dim() == 0:
        return q
    return fuse_qkv(q, k, v, n_kv_heads)


def fused_optim_values(values: dict) -> dict:
    """trainrun.json's ``optim_values`` (param-group settings per parameter) under fused names: wq's become
    wqkv's, wk's and wv's (the same settings) are dropped. A current checkpoint's come back unchanged."""
    out = {}
    for key, value in values.items():
        if PARTS[1] in key or PARTS[2] in key:
            continue
        out[key.replace(PARTS[0], FUSED)] = value
    return out


def separate_qkv_error(source: object, names: Iterable[str]) -> SeparateQkvCheckpoint | None:
    """The error for ``source`` in the separate layout where it cannot be converted on load, else None."""
    if not has_separate_qkv(names):
        return None
    return SeparateQkvCheckpoint(
        f"{source} holds separate attention.wq/wk/wv projections (saved before trainrun fused them into "
        "attention.wqkv) and cannot be converted here; resume from one of the run's persistent checkpoints "
        "(checkpoint.resume=<its step dir>), which are converted as they load, or export it with trainrun-export")
