"""Building blocks of the GPT decoder: norms, RoPE, attention, MLP and the pre-norm block.

Module names follow torchtitan's llama (``attention.wq/wk/wv/wo``, ``mlp.w1/w2/w3``) so that a
tensor-parallel plan can address them by name: wq/wk/wv/w1/w3 are column-parallel, wo/w2 row-parallel.
Nothing here knows about parallelism.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainrun.config.choices import Mlp, Norm
from trainrun.config.schema import ModelConfig


def build_norm(cfg: ModelConfig) -> nn.Module:
    """RMSNorm (weight only: ``nn.RMSNorm`` has no bias) or LayerNorm (bias iff ``cfg.bias``)."""
    if cfg.norm is Norm.rmsnorm:
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(head_dim: int, max_seq_len: int, theta: float,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotate-half RoPE (Su et al. 2021), each (max_seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # (hs/2,)
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
    """Causal multi-head self-attention with separate q/k/v projections (clean TP sharding)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = dropout_layer(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); ``rope`` is (cos, sin) of at least T rows, or None for learned positions.

        The tables are cropped here rather than by the caller because under sequence parallelism
        only this module sees the whole sequence (its input is gathered along T).
        """
        B, T, _ = x.shape
        # -1 rather than n_heads: under TP the local projection holds only n_heads/tp heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]  # (T, hs) each
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
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
