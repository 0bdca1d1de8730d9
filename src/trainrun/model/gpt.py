"""GPT decoder-only language model (nanoGPT / torchtitan llama style), built from a ``ModelConfig``.

Meta-device friendly: build under ``with torch.device("meta"):``, then ``to_empty(device=...)`` and
``init_weights()`` (see ``trainrun.model.init.materialize``). ``init_plan`` is the single place that
says how every parameter gets its value (``init_buffers`` the buffers), so a sharded model
initialised parameter by parameter from rank 0 gets the same values as a plain single-device build.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainrun.config.choices import Position
from trainrun.config.schema import ModelConfig
from trainrun.errors import ConfigError
from trainrun.model.init import ParamInit, check_plan_covers
from trainrun.model.layers import Block, build_norm, dropout_layer, rope_cache
from trainrun.registry import MODELS

# Output projections of the residual branches: their init std is scaled by 1/sqrt(2*n_layers) so the
# residual stream's variance does not grow with depth (GPT-2, Megatron-LM).
RESIDUAL_OUTPUT_NAMES = ("wo", "w2")


class GPT(nn.Module):
    """Token embedding -> ``n_layers`` pre-norm blocks -> final norm -> vocabulary projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size", cfg.vocab_size,
                              "resolve it to a positive int (from the dataset) before building the model")
        self.cfg = cfg
        self.max_seq_len = cfg.max_seq_len
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position is Position.learned else None
        self.dropout = dropout_layer(cfg.dropout)
        # A ModuleDict keyed "0".."L-1" keeps parameter names stable if pipeline stages delete blocks.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = build_norm(cfg)
        # No bias on the vocabulary projection (nanoGPT, llama); it could not be tied anyway.
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE tables are derived, not learned: non-persistent so checkpoints do not carry them and
        # recomputed by init_weights() because to_empty() leaves them uninitialised.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        if cfg.position is Position.rope:
            cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling)
            self.rope_cos, self.rope_sin = cos, sin
        self.init_weights()

    def init_plan(self) -> list[ParamInit]:
        """How every parameter gets its initial value, in the order the values are drawn (module
        registration order: deterministic). The single definition of the model's initialisation:
        ``init_weights`` applies it here, ``trainrun.distributed.parallelize`` one parameter at a time.

        Linear and embedding weights ~ N(0, init_std), except wo/w2 ~ N(0, init_std/sqrt(2*n_layers));
        biases 0; norm weights 1 and biases 0. The fused ``wqkv`` is one N(0, init_std) draw: each of its
        q, k and v parts gets the N(0, init_std) the separate wq/wk/wv had. A tied weight is drawn once,
        under its first name, so RNG use does not depend on tying. Works on a ``meta`` model.
        """
        cfg = self.cfg
        self._tie_embeddings()
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        plan: list[ParamInit] = []
        seen: set[int] = set()

        def add(name: str, param: nn.Parameter | None, **how: float) -> None:
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                plan.append(ParamInit(name, tuple(param.shape), param.dtype, **how))

        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):
                leaf = name.rsplit(".", 1)[-1]
                add(prefix + "weight", module.weight, std=out_std if leaf in RESIDUAL_OUTPUT_NAMES else std)
                add(prefix + "bias", getattr(module, "bias", None), constant=0.0)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                add(prefix + "weight", module.weight, constant=1.0)
                add(prefix + "bias", getattr(module, "bias", None), constant=0.0)
        return plan

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter (``init_plan``) and buffer from the current torch RNG,
        deterministically. Also re-ties the output projection to the token embedding, because
        ``to_empty`` replaces the two tied parameters with two separate tensors."""
        plan = self.init_plan()
        check_plan_covers(self, plan)
        params = dict(self.named_parameters())
        for spec in plan:
            spec.fill(params[spec.name])
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Restore what ``to_empty`` loses and no state dict carries, drawing no random numbers: the
        derived non-persistent buffers (RoPE tables) and the output/embedding tie."""
        self._tie_embeddings()
        cfg = self.cfg
        if cfg.position is Position.rope:
            device = self.rope_cos.device if self.rope_cos is not None else None
            cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device,
                                  scaling=cfg.rope_scaling)
            self.rope_cos, self.rope_sin = cos, sin

    def _tie_embeddings(self) -> None:
        """Make the output projection share the token embedding's weight (``model.tie_embeddings``).

        A no-op where the tie holds (``to_empty`` of a sharded model keeps it) or where a pipeline stage
        lacks one of the two modules; re-ties after a plain ``to_empty``, which makes two tensors of one."""
        output, embeddings = getattr(self, "output", None), getattr(self, "tok_embeddings", None)
        if self.cfg.tie_embeddings and output is not None and embeddings is not None \
                and output.weight is not embeddings.weight:
            output.weight = embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab_size).

        A pipeline stage (see ``trainrun.distributed.pipeline``) deletes the modules it does not own:
        without ``tok_embeddings`` the input is already the hidden state (B, T, C), and without
        ``output`` the hidden state (B, T, C) is returned.
        """
        T = tokens.shape[1]
        if self.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.max_seq_len}")
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(tokens)  # (B, T, C)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(torch.arange(T, device=tokens.device))  # (T, C) broadcast over B
            x = self.dropout(x)
        else:
            x = tokens  # (B, T, C) from the previous pipeline stage
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None  # (max_seq_len, hs) each
        for layer in self.layers.values():
            x = layer(x, rope)  # (B, T, C)
        if self.norm is not None:
            x = self.norm(x)
        return self.output(x) if self.output is not None else x  # (B, T, V) or (B, T, C)


@MODELS.register("gpt")
def build_gpt(cfg: ModelConfig) -> nn.Module:
    """Build a ``GPT`` on the current default device (use ``torch.device("meta")`` for big models)."""
    return GPT(cfg)
