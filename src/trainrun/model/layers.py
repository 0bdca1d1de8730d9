"""Building blocks of the GPT decoder: norms, RoPE, attention, MLP and the pre-norm block.

Module names follow torchtitan's llama (``attention.wo``, ``mlp.w1/w2/w3``), with q/k/v fused into one
``attention.wqkv`` in Megatron's head-interleaved layout (:mod:`trainrun.model.qkv`), so that a
tensor-parallel plan can address them by name: wqkv/w1/w3 are column-parallel, wo/w2 row-parallel.
Nothing here knows about parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainrun.config.choices import Mlp, Norm, RopeScaling
from trainrun.config.schema import ModelConfig, RopeScalingConfig


def build_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (weight only: ``nn.RMSNorm`` has no bias) or LayerNorm (bias iff ``cfg.bias``)."""
    if cfg.norm is Norm.rmsnorm:
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's rescaled inverse frequencies (hs/2,), exactly as transformers' ``_compute_llama3_parameters``.

    Wavelengths shorter than ``original/high_freq_factor`` are kept (they resolve local order),
    longer than ``original/low_freq_factor`` are stretched by ``factor`` (so the longer context
    stays within the angles seen in pre-training), and those between are blended linearly in
    ``original/wavelength``.
    """
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq  # (hs/2,)
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
               scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotate-half RoPE (Su et al. 2021), each (max_seq_len, head_dim), in fp32.

    ``scaling`` of type llama3 rescales the frequencies as Llama 3.1 does (:func:`llama3_inv_freq`).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (hs/2,)
    if scaling is not None and scaling.type is RopeScaling.llama3:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs): the two halves share frequencies (rotate-half layout)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, nh, T, hs) by the position angles; cos/sin are (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity when ``p`` is 0: a p=0 dropout still launches a kernel per call."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    """Causal self-attention with one fused q/k/v projection: multi-head, or grouped-query (Ainslie et al.
    2023) when ``n_kv_heads < n_heads``, each key/value head then serving n_heads/n_kv_heads consecutive
    query heads (transformers' ``repeat_kv`` grouping).

    ``wqkv``'s rows are in Megatron's layout, grouped by kv head ([its query heads, k, v] per group, see
    :mod:`trainrun.model.qkv`): one matmul instead of three, and a column-parallel shard still holds whole
    groups, so tensor parallelism shards by heads as with separate projections.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_per_kv = cfg.n_heads // cfg.kv_heads
        self.gqa = cfg.kv_heads != cfg.n_heads
        self.dropout = cfg.dropout
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * self.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = dropout_layer(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``rope`` is (cos, sin) of at least T rows, or None for learned positions.

        The tables are cropped here rather than by the caller because under sequence parallelism
        only this module sees the whole sequence (its input is gathered along T).
        """
        B, T, _ = x.shape
        hs = self.head_dim
        # -1 groups rather than n_kv_heads: under TP the local wqkv holds only n_kv_heads/tp whole groups.
        qkv = self.wqkv(x).view(B, T, -1, self.q_per_kv + 2, hs)  # (B, T, groups, q_per_kv + 2, hs)
        q, k, v = qkv.split([self.q_per_kv, 1, 1], dim=3)
        q = q.reshape(B, T, -1, hs).transpose(1, 2)  # (B, nh, T, hs); query head g*q_per_kv + j is q[g, j]
        k = k.squeeze(3).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.squeeze(3).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]  # (T, hs) each
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa lets SDPA broadcast each kv head over its group of query heads without a copy.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True, enable_gqa=self.gqa
        )  # (B, nh, T, hs); flash / memory-efficient kernels never materialise the (T, T) scores
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    """SwiGLU (``w2(silu(w1 x) * w3 x)``) or GELU (``w2(gelu(w1 x))``, no w3) feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_hidden_size()
        self.swiglu = cfg.mlp is Mlp.swiglu
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # gate (swiglu) / up (gelu)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)  # down
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if self.swiglu else None  # up (swiglu)
        self.dropout = dropout_layer(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        h = F.silu(self.w1(x)) * self.w3(x) if self.swiglu else F.gelu(self.w1(x))  # (B, T, ffn)
        return self.dropout(self.w2(h))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = build_norm(cfg)
        self.attention = Attention(cfg)
        self.mlp_norm = build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))
