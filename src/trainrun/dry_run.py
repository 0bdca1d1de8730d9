"""``run.dry_run=true``: size, cost and memory of a run, from the config and a meta-device model."""

from __future__ import annotations

import torch

from trainrun import registry
from trainrun.config.schema import TrainRunConfig
from trainrun.model import count_parameters, estimate_training_memory, flops_per_token


def _meta_parameter_count(cfg: TrainRunConfig) -> int:
    # Building on the meta device proves the config constructs without allocating any weight.
    with torch.device("meta"):
        model = registry.MODELS.get(cfg.model.name)(cfg.model)
    return sum(p.numel() for p in model.parameters())


def dry_run_report(cfg: TrainRunConfig) -> str:
    """A table of parameters, FLOPs/token, tokens per step and estimated memory per device."""
    params = _meta_parameter_count(cfg)
    analytic = count_parameters(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    p = cfg.parallel
    memory = estimate_training_memory(
        cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.precision,
        dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, activation_checkpointing=p.activation_checkpointing,
    )
    accum = cfg.accumulation_steps()
    lines = [
        (f"parameters           {params:,} (analytic {analytic:,}; "
         f"non-embedding {count_parameters(cfg.model, include_embeddings=False):,})"),
        f"FLOPs per token      {fpt:.4g} (6N + attention, forward+backward)",
        (f"tokens per step      {tokens_per_step:,} (global batch {cfg.train.global_batch_size} "
         f"x seq {cfg.data.seq_len}; {accum} micro-batches of {cfg.train.micro_batch_size} per rank)"),
        f"FLOPs per step       {fpt * tokens_per_step:.4g}",
        (f"layout               dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} pp={p.pp} "
         f"({p.dp_replicate * p.dp_shard * p.tp * p.pp} devices; "
         f"activation checkpointing {p.activation_checkpointing})"),
        f"memory per device    ({cfg.train.precision}; model state sharded by dp_shard x tp x pp)",
        memory.format(),
    ]
    return "\n".join(lines)
