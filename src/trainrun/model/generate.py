"""Autoregressive sampling from a causal language model."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after the prompt ``tokens`` (1, T); returns (1, T + max_new_tokens).

    The context is cropped to the model's last ``max_seq_len`` tokens (``model.max_seq_len`` unless
    given). ``temperature`` <= 0 picks the argmax; ``top_k`` None or 0 disables top-k filtering.
    Recomputes the full context each step (no KV cache): meant for short samples, not serving.
    The model is put in eval mode for sampling and its previous mode is restored afterwards.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    if max_seq_len is None:  # a DDP-style wrapper keeps the model in .module
        max_seq_len = getattr(model, "max_seq_len", getattr(getattr(model, "module", None), "max_seq_len", None))
    limit = max_seq_len
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = tokens if limit is None else tokens[:, -limit:]  # (B, <=max_seq_len)
            logits = model(context)[:, -1, :].float()  # (B, V): only the last position predicts the next token
            if temperature <= 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            tokens = torch.cat((tokens, next_token.to(tokens.dtype)), dim=1)
    finally:
        model.train(was_training)
    return tokens
