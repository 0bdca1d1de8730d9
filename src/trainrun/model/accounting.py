"""Analytic model accounting from a ``ModelConfig`` alone: parameters, FLOPs, training memory.

No tensors are built, so these run instantly for any size (dry runs, MFU, capacity planning).
``count_parameters`` is exact for ``trainrun.model.gpt.GPT``; the FLOP and memory figures are the
standard estimates and say which approximations they make.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from trainrun.config.choices import ActivationCheckpointing, Mlp, Norm, Position, Precision
from trainrun.config.schema import ModelConfig
from trainrun.errors import ConfigError


def _vocab(cfg: ModelConfig) -> int:
    if not isinstance(cfg.vocab_size, int) or cfg.vocab_size <= 0:
        raise ConfigError("model.vocab_size", cfg.vocab_size, "resolve it to a positive int before accounting")
    return cfg.vocab_size


def count_parameters(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Exact number of distinct parameters of ``GPT(cfg)``.

    ``include_embeddings=False`` leaves out every vocabulary- or position-sized table: the token
    embedding, the learned position embedding and an untied output projection (the "non-embedding"
    N of Kaplan et al. 2020). Norms count a weight (RMSNorm, which has no bias) plus a bias for
    LayerNorm with ``cfg.bias``; the output projection never has a bias.
    """
    d, L = cfg.d_model, cfg.n_layers
    hidden = cfg.ffn_hidden_size()
    norm = d + (d if cfg.norm is Norm.layernorm and cfg.bias else 0)
    kv = cfg.kv_heads * cfg.head_dim  # width of k and v: d, or less with grouped-query attention
    attention = 2 * d * d + 2 * d * kv + ((2 * d + 2 * kv) if cfg.bias else 0)  # wqkv: d->d+2kv, wo: d->d
    if cfg.mlp is Mlp.swiglu:
        mlp = 3 * d * hidden + ((2 * hidden + d) if cfg.bias else 0)  # w1, w3: d->h; w2: h->d
    else:
        mlp = 2 * d * hidden + ((hidden + d) if cfg.bias else 0)  # w1: d->h; w2: h->d
    non_embedding = L * (attention + mlp + 2 * norm) + norm  # + final norm
    if not include_embeddings:
        return non_embedding
    V = _vocab(cfg)
    embeddings = V * d
    if cfg.position is Position.learned:
        embeddings += cfg.max_seq_len * d
    if not cfg.tie_embeddings:
        embeddings += V * d
    return non_embedding + embeddings


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: ``6*(N + d*V) + 12*L*d*T``.

    N is the non-embedding parameter count; every such weight costs 2 FLOPs per token forward
    and 4 backward (6N). The output projection is a d x V matmul whatever the tying, so it is added
    as d*V (embedding lookups are free). The attention term 12*L*d*T counts QK^T and AV (2 matmuls of
    2*T*d FLOPs per token forward, x3 for fwd+bwd) over the full T x T square, without discounting
    the causal mask, as in PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM's MFU.
    """
    V = _vocab(cfg)
    n = count_parameters(cfg, include_embeddings=False) + cfg.d_model * V
    return float(6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated training memory per device, in bytes."""

    params: int
    grads: int
    optimizer_state: int
    activations: int
    total: int

    def as_dict(self) -> dict[str, int]:
        """The fields as a plain dict (for JSON metrics)."""
        return asdict(self)

    def format(self) -> str:
        """One log line in GiB, e.g. ``params 0.50 GiB | grads ... | total 3.10 GiB``."""
        gib = 1024**3
        names = ("params", "grads", "optimizer_state", "activations", "total")
        return " | ".join(f"{n} {getattr(self, n) / gib:.2f} GiB" for n in names)


def estimate_training_memory(
    cfg: ModelConfig,
    micro_batch_size: int,
    seq_len: int,
    precision: Precision = Precision.fp32,
    dp_shard: int = 1,
    tp: int = 1,
    pp: int = 1,
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none,
    *,
    flash_attention: bool = True,
) -> MemoryEstimate:
    """Peak training memory per device of AdamW mixed-precision training, roughly.

    Model state: fp32 master weights (4 B/param), fp32 grads (4) and AdamW's two fp32 moments (8),
    all sharded by ``dp_shard`` (FSDP) and divided by ``tp * pp``. Data-parallel replicas (DDP, or HSDP's
    outer dim) do not lower per-device memory, so ``parallel.dp_replicate`` is not a parameter.
    bf16/fp16 is autocast, so no second weight copy is kept.

    Activations per layer follow Korthikanti et al. 2022 (for 16-bit, in bytes):
    ``s*b*h*(34 + 5*a*s/h)``, doubled for fp32; with grouped-query attention the stored keys and values
    (2*s*b*h each of the 34) shrink by ``n_kv_heads/n_heads``. With ``flash_attention`` (the default: SDPA's flash /
    memory-efficient kernels) the (s x s) score term ``5*a*s/h`` is never stored, so only ``34*s*b*h``
    remains. Activation checkpointing (``trainrun.distributed.activation_checkpoint``) recomputes
    whole blocks: a checkpointed block keeps only its input ``2*s*b*h``; ``full`` checkpoints every
    block, ``selective`` every other one; either adds one layer's full activations as the working
    set of the block being recomputed. Activations are divided by ``tp`` (sequence
    parallelism assumed) but not by ``pp``: with 1F1B the first stage holds ``pp`` micro-batches of
    ``L/pp`` layers, i.e. L layers' worth. Logits add ``s*b*V*4`` bytes (fp32 for the loss, vocab-sharded
    by tp). Ignores allocator fragmentation, temporary buffers and communication buckets.
    """
    precision, activation_checkpointing = Precision(precision), ActivationCheckpointing(activation_checkpointing)

    n = count_parameters(cfg)
    shards = dp_shard * tp * pp
    params = math.ceil(4 * n / shards)
    grads = math.ceil(4 * n / shards)
    optimizer_state = math.ceil(8 * n / shards)

    s, b, h, a, L = seq_len, micro_batch_size, cfg.d_model, cfg.n_heads, cfg.n_layers
    scale = precision.activation_bytes / 2  # the formula's coefficients are 16-bit bytes
    score_term = 0.0 if flash_attention else 5 * a * s / h
    kv_saving = 4 * (1 - cfg.kv_heads / cfg.n_heads)  # keys and values stored at n_kv_heads/n_heads of 2*s*b*h each
    full_layer = s * b * h * (34 - kv_saving + score_term) * scale
    recomputed = sum(activation_checkpointing.recomputes(i) for i in range(L))
    if recomputed == 0:
        layers = L * full_layer
    else:
        layers = recomputed * 2 * s * b * h * scale + (L - recomputed) * full_layer + full_layer
    logits = s * b * _vocab(cfg) * 4
    activations = math.ceil((layers + logits) / tp)

    total = params + grads + optimizer_state + activations
    return MemoryEstimate(params, grads, optimizer_state, activations, total)
