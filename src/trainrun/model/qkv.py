"""Megatron's head-interleaved layout of the fused q/k/v projection ``attention.wqkv``.

The rows of ``wqkv`` (out = (n_heads + 2*n_kv_heads) * head_dim) are grouped by key/value head: for each
of the n_kv_heads groups g, the q_per_kv = n_heads/n_kv_heads query heads that attend with kv head g, then
k_g, then v_g::

    [q_{g*q_per_kv} .. q_{(g+1)*q_per_kv - 1}, k_g, v_g]  for g = 0 .. n_kv_heads-1   (each head_dim rows)

so a contiguous (column-parallel) shard over ``tp`` ranks, tp dividing n_kv_heads, holds n_kv_heads/tp whole
groups: its query heads and exactly the key/value heads they need (Megatron-LM's ``linear_qkv``). Query head
h is served by kv head h // q_per_kv, transformers' ``repeat_kv`` grouping.

:func:`trainrun.hf.mapping.qkv_segments` lists the same rows as plain numbers (that module imports no torch);
``fuse_qkv``/``split_qkv`` convert between the fused tensor and the separate q/k/v ones (weights or biases).
"""

from __future__ import annotations


def fuse_qkv(q, k, v, n_kv_heads: int):
    """The wqkv tensor (weight or bias) of separate q (n_heads*hs, ...), k and v (n_kv_heads*hs, ...)."""
    import torch

    rest = tuple(q.shape[1:])
    parts = [t.reshape(n_kv_heads, -1, *rest) for t in (q, k, v)]  # (G, rows per group, ...)
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(fused, n_heads: int, n_kv_heads: int):
    """(q, k, v) of a wqkv tensor (weight or bias): the inverse of :func:`fuse_qkv`."""
    rest = tuple(fused.shape[1:])
    grouped = fused.reshape(n_kv_heads, -1, *rest)  # (G, (q_per_kv + 2) * hs, ...)
    hs = grouped.shape[1] // (n_heads // n_kv_heads + 2)
    q, k, v = grouped.split([grouped.shape[1] - 2 * hs, hs, hs], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))
