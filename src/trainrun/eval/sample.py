"""Text sampling from a trained model, for the sample printed at the end of a run."""

from __future__ import annotations

import torch
from torch import nn

from trainrun.model.generate import generate


@torch.no_grad()
def sample_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int, device: torch.device) -> str:
    """Continue ``prompt`` with ``max_new_tokens`` sampled tokens; seeded, independent of the training RNG."""
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=generator)
    model.train()
    return tokenizer.decode(out[0].tolist())
