"""Cross-field validation run before anything expensive: every error names the field and the fix."""

from __future__ import annotations

import os
from pathlib import Path

from trainrun.config.errors import ConfigError
from trainrun.config.schema import TrainRunConfig


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(field, value, f"use one of {', '.join(choices)}")


def _positive(field: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(field, value, "must be " + ("non-negative" if allow_zero else "positive"))


def _registered(registry, name: str, field: str) -> None:
    if name not in registry:
        raise ConfigError(field, name, f"not a registered {registry.kind}; registered: {', '.join(registry.names())}")


def validate_model(cfg: TrainRunConfig) -> None:
    """Shape checks of ``model`` and its fit with ``data``."""
    m = cfg.model
    for name in ("n_layers", "n_heads", "d_model", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}; pick a divisor of it")
    _choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    _choice("model.position", m.position, ("rope", "learned"))
    _choice("model.mlp", m.mlp, ("swiglu", "gelu"))
    if m.position == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.n_heads", m.n_heads, "RoPE needs an even head size d_model/n_heads")
    if m.vocab_size is not None:
        _positive("model.vocab_size", m.vocab_size)
    if m.ffn_hidden is not None:
        _positive("model.ffn_hidden", m.ffn_hidden)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("model.dropout", m.dropout, "must be in [0, 1)")
    _positive("data.seq_len", cfg.data.seq_len)
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError("data.seq_len", cfg.data.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}; lower it or raise model.max_seq_len")


def data_parallel_size(cfg: TrainRunConfig) -> int:
    """Number of data-parallel ranks (replicate x shard)."""
    return cfg.parallel.dp_replicate * cfg.parallel.dp_shard


def validate_parallel(cfg: TrainRunConfig, world_size: int | None = None) -> None:
    """Degrees are positive and multiply to the world size (read from WORLD_SIZE when not given)."""
    p = cfg.parallel
    for name in ("dp_replicate", "dp_shard", "tp", "pp"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("parallel.timeout_min", p.timeout_min)
    product = p.dp_replicate * p.dp_shard * p.tp * p.pp
    if world_size is None and cfg.run.dry_run and "WORLD_SIZE" not in os.environ:
        world_size = product  # a dry run on one process plans the layout for the world it describes
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if product != world_size:
        raise ConfigError(
            "parallel",
            f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} pp={p.pp}",
            f"degrees multiply to {product} but the world size is {world_size}; make their product equal {world_size}",
        )
    _choice("parallel.activation_checkpointing", p.activation_checkpointing, ("none", "selective", "full"))
    if p.tp > 1:
        validate_tensor_parallel(cfg)
    validate_pipeline(cfg)


def validate_tensor_parallel(cfg: TrainRunConfig) -> None:
    """Heads, MLP width and sequence length split evenly over ``parallel.tp``."""
    from trainrun.model.layers import ffn_hidden_size

    tp, m = cfg.parallel.tp, cfg.model
    if m.n_heads % tp:
        raise ConfigError("parallel.tp", tp, f"must divide model.n_heads={m.n_heads} (each rank holds n_heads/tp heads)")
    if ffn_hidden_size(m) % tp:
        raise ConfigError("parallel.tp", tp, f"must divide the MLP hidden size {ffn_hidden_size(m)}; set model.ffn_hidden")
    if cfg.data.seq_len % tp:
        raise ConfigError("parallel.tp", tp, f"must divide data.seq_len={cfg.data.seq_len} (sequence parallelism)")
    if m.position == "learned":
        raise ConfigError("model.position", "learned", "tensor parallelism supports rope positions only")


def validate_pipeline(cfg: TrainRunConfig) -> None:
    """Schedule name, stage count and micro-batch arithmetic of pipeline parallelism."""
    p, m = cfg.parallel, cfg.model
    _choice("parallel.pp_schedule", p.pp_schedule, ("GPipe", "1F1B", "Interleaved1F1B"))
    _positive("parallel.pp_stages_per_rank", p.pp_stages_per_rank)
    if p.pp_microbatches is not None:
        _positive("parallel.pp_microbatches", p.pp_microbatches)
    if p.pp == 1:
        return
    stages = p.pp * p.pp_stages_per_rank
    if m.n_layers % stages:
        raise ConfigError("parallel.pp", p.pp, f"pp*pp_stages_per_rank={stages} must divide model.n_layers={m.n_layers}")
    interleaved = p.pp_schedule == "Interleaved1F1B"
    if interleaved and p.pp_stages_per_rank < 2:
        raise ConfigError("parallel.pp_stages_per_rank", p.pp_stages_per_rank, "Interleaved1F1B needs at least 2 virtual stages per rank")
    if not interleaved and p.pp_stages_per_rank != 1:
        raise ConfigError("parallel.pp_stages_per_rank", p.pp_stages_per_rank, f"{p.pp_schedule} runs one stage per rank; set it to 1 or use Interleaved1F1B")
    n_mb = p.pp_microbatches if p.pp_microbatches is not None else p.pp * (2 if interleaved else 1)
    local_batch = cfg.train.global_batch_size // data_parallel_size(cfg)
    if local_batch % n_mb:
        raise ConfigError("parallel.pp_microbatches", n_mb,
                          f"must divide the per-data-parallel-rank batch {local_batch} (train.global_batch_size / dp)")
    if p.pp_schedule != "GPipe" and n_mb < p.pp:
        raise ConfigError("parallel.pp_microbatches", n_mb, f"{p.pp_schedule} needs at least pp={p.pp} micro-batches")
    if interleaved and n_mb % p.pp:
        raise ConfigError("parallel.pp_microbatches", n_mb, f"Interleaved1F1B needs a multiple of pp={p.pp}")
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings", True, "the embedding and output live on different pipeline stages; set it to false")
    if cfg.train.step_executor != "eager":
        raise ConfigError("train.step_executor", cfg.train.step_executor, "pipeline parallelism runs its own schedule; use eager")
    if cfg.train.precision == "fp16":
        raise ConfigError("train.precision", "fp16", "the pipeline executor has no loss scaler; use bf16 or fp32 with parallel.pp>1")


def validate_train(cfg: TrainRunConfig) -> None:
    """Batch arithmetic, step counts, precision and device."""
    t = cfg.train
    for name in ("max_steps", "micro_batch_size", "global_batch_size", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    per_step = t.micro_batch_size * data_parallel_size(cfg)
    if t.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size", t.global_batch_size,
            f"must be divisible by micro_batch_size*data_parallel_size={per_step}; use a multiple of {per_step}",
        )
    _choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
    _choice("run.device", cfg.run.device, ("auto", "cpu", "cuda"))
    if cfg.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device", "cuda", "no CUDA device is visible; use run.device=cpu or auto")
    if t.precision == "fp16" and resolve_device_type(cfg) != "cuda":
        raise ConfigError("train.precision", "fp16", "fp16 needs CUDA; use bf16 or fp32 on CPU")
    if t.step_executor == "cuda_graph" and resolve_device_type(cfg) != "cuda":
        raise ConfigError("train.step_executor", "cuda_graph", "CUDA-graph capture needs a CUDA device; use eager or compile")
    if t.exit_interval is not None:
        _positive("train.exit_interval", t.exit_interval)
    if t.exit_duration_min is not None:
        _positive("train.exit_duration_min", t.exit_duration_min)
    _positive("train.max_skipped_steps", t.max_skipped_steps)
    e = cfg.eval
    _positive("eval.interval", e.interval, allow_zero=True)
    _positive("eval.iters", e.iters)
    _positive("eval.sample_tokens", e.sample_tokens, allow_zero=True)
    _positive("eval.temperature", e.temperature)


def validate_checkpoint(cfg: TrainRunConfig) -> None:
    """Intervals and the resume target."""
    c = cfg.checkpoint
    _positive("checkpoint.interval", c.interval, allow_zero=True)
    _positive("checkpoint.keep_last", c.keep_last, allow_zero=True)
    _positive("checkpoint.non_persistent_interval", c.non_persistent_interval, allow_zero=True)
    if c.time_interval_min is not None:
        _positive("checkpoint.time_interval_min", c.time_interval_min)
    _choice("checkpoint.verify", c.verify, ("sha256", "size", "none"))
    import signal

    for name in c.exit_signals:
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError("checkpoint.exit_signals", name, "use catchable signal names such as SIGTERM, SIGUSR1, SIGUSR2")
    if c.resume not in ("auto", "never") and not Path(c.resume).is_dir():
        raise ConfigError("checkpoint.resume", c.resume, "use auto, never, or the path of an existing checkpoint directory")


def validate_components(cfg: TrainRunConfig) -> None:
    """Every configured component name is registered."""
    from trainrun import registry as r

    r.import_plugin_modules(cfg.run.plugins)
    _registered(r.MODELS, cfg.model.name, "model.name")
    _registered(r.OPTIMIZERS, cfg.optim.name, "optim.name")
    _registered(r.LR_SCHEDULES, cfg.optim.schedule, "optim.schedule")
    _registered(r.DATASETS, cfg.data.name, "data.name")
    _registered(r.STEP_EXECUTORS, cfg.train.step_executor, "train.step_executor")
    _registered(r.EVALUATORS, cfg.eval.name, "eval.name")
    _registered(r.INITIALIZERS, cfg.parallel.initializer, "parallel.initializer")
    for policy in cfg.checkpoint.policies:
        _registered(r.CHECKPOINT_POLICIES, policy, "checkpoint.policies")
    for sink in cfg.logging.sinks:
        _registered(r.METRIC_SINKS, sink, "logging.sinks")
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ("online", "offline", "disabled"))


def resolve_device_type(cfg: TrainRunConfig) -> str:
    """``run.device`` with auto resolved to cuda or cpu."""
    if cfg.run.device != "auto":
        return cfg.run.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_config(cfg: TrainRunConfig, world_size: int | None = None) -> None:
    """Run every check that needs no model, no data read and no process group."""
    from trainrun.data import validate_data_config
    from trainrun.optim import validate_optim_config

    validate_components(cfg)
    validate_model(cfg)
    validate_parallel(cfg, world_size)
    validate_train(cfg)
    validate_optim_config(cfg.optim, cfg.train.max_steps)
    validate_data_config(cfg.data)
    validate_checkpoint(cfg)
