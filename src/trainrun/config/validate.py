"""Validation of a whole run config, before anything expensive: every error names the field and the fix.

Each group checks its own fields (``<Group>Config.validate`` in ``schema.py``); this module runs
those, then holds every rule that involves several groups, then checks registry-backed names and
lets the chosen components check what they can honour (the registry's ``check`` hooks: a dataset
its directory, a step executor the device, layout and settings it runs with). Nothing here imports
trainrun's components or names one: the registry resolves names, torch answers whether CUDA is
there, and a new executor or dataset needs no edit here.
"""

from __future__ import annotations

import os

from trainrun.config.blend import source_sections
from trainrun.config.choices import Device, Position, Precision
from trainrun.config.schema import TrainRunConfig
from trainrun.errors import ConfigError, DataError


def resolve_device_type(cfg: TrainRunConfig) -> str:
    """``run.device`` with auto resolved to cuda or cpu."""
    if cfg.run.device is not Device.auto:
        return cfg.run.device.value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def expected_world_size(cfg: TrainRunConfig) -> int:
    """The world size the launcher set up (WORLD_SIZE, else SLURM_NTASKS, else 1).

    A dry run in one process plans for the world its degrees describe.
    """
    if cfg.run.dry_run and "WORLD_SIZE" not in os.environ:
        return cfg.parallel.world_size
    return launcher_world_size()


def launcher_world_size() -> int:
    """Processes the launcher started: WORLD_SIZE (torchrun), else SLURM_NTASKS, else 1."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def check_world_size(cfg: TrainRunConfig, world_size: int) -> None:
    """The parallel degrees multiply to ``world_size``."""
    p = cfg.parallel
    if p.world_size != world_size:
        raise ConfigError(
            "parallel",
            f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} pp={p.pp}",
            f"degrees multiply to {p.world_size} but the world size is {world_size}; "
            f"make their product equal {world_size}",
        )


def check_sequence(cfg: TrainRunConfig) -> None:
    """Training samples fit the model's context."""
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError("data.seq_len", cfg.data.seq_len,
                          f"must be <= model.max_seq_len={cfg.model.max_seq_len}; lower it or raise model.max_seq_len")


def check_batch(cfg: TrainRunConfig) -> None:
    """The global batch splits into whole micro-batches on every data-parallel rank."""
    t = cfg.train
    per_step = t.micro_batch_size * cfg.parallel.data_parallel_size
    if t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size", t.global_batch_size,
                          f"must be divisible by micro_batch_size*data_parallel_size={per_step}; "
                          f"use a multiple of {per_step}")


def check_tensor_parallel(cfg: TrainRunConfig) -> None:
    """Query and key/value heads, MLP width and sequence length split evenly over ``parallel.tp``; RoPE only."""
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return
    if m.n_heads % tp:
        raise ConfigError("parallel.tp", tp,
                          f"must divide model.n_heads={m.n_heads} (each rank holds n_heads/tp heads)")
    if m.kv_heads % tp:
        raise ConfigError("parallel.tp", tp, f"must divide model.n_kv_heads={m.kv_heads} (each rank holds "
                          "n_kv_heads/tp key/value heads); lower parallel.tp or raise model.n_kv_heads")
    if m.ffn_hidden_size() % tp:
        raise ConfigError("parallel.tp", tp,
                          f"must divide the MLP hidden size {m.ffn_hidden_size()}; set model.ffn_hidden")
    if cfg.data.seq_len % tp:
        raise ConfigError("parallel.tp", tp, f"must divide data.seq_len={cfg.data.seq_len} (sequence parallelism)")
    if m.position is Position.learned:
        raise ConfigError("model.position", m.position, "tensor parallelism supports rope positions only")


def check_pipeline(cfg: TrainRunConfig) -> None:
    """Stages divide the layers, micro-batches divide the batch, and the model splits into stages.

    Which step executor runs the stages is the executors' own check (registry ``check`` hooks).
    """
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return
    stages = p.pp * p.pp_stages_per_rank
    if m.n_layers % stages:
        raise ConfigError("parallel.pp", p.pp,
                          f"pp*pp_stages_per_rank={stages} must divide model.n_layers={m.n_layers}")
    n_mb = p.pipeline_microbatches()
    local_batch = cfg.train.global_batch_size // p.data_parallel_size
    if local_batch % n_mb:
        raise ConfigError("parallel.pp_microbatches", n_mb,
                          f"must divide the per-data-parallel-rank batch {local_batch} (train.global_batch_size / dp)")
    if m.tie_embeddings:
        raise ConfigError("model.tie_embeddings", True,
                          "the embedding and output live on different pipeline stages; set it to false")


def check_device(cfg: TrainRunConfig) -> None:
    """CUDA-only settings get a CUDA device."""
    if cfg.run.device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device", "cuda", "no CUDA device is visible; use run.device=cpu or auto")
    on_cuda = resolve_device_type(cfg) == "cuda"
    if cfg.train.precision is Precision.fp16 and not on_cuda:
        raise ConfigError("train.precision", "fp16", "fp16 needs CUDA; use bf16 or fp32 on CPU")
    if cfg.train.precision is Precision.fp8:
        check_fp8_available(on_cuda)
    if cfg.debug.memory_snapshot and not on_cuda:
        raise ConfigError("debug.memory_snapshot", True, "CUDA memory snapshots need a CUDA device; on CPU use "
                          "debug.profile_steps for a trace, or the mem_gib column")


def check_fp8_available(on_cuda: bool) -> None:
    """fp8 training: torchao's float8 linears on a GPU with fp8 tensor cores (compute capability >= 8.9)."""
    if not on_cuda:
        raise ConfigError("train.precision", "fp8", "float8 training needs a CUDA GPU with compute capability >= 8.9 "
                          "(H100, L40S, RTX 4090); use bf16")
    import importlib.util

    import torch

    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError("train.precision", "fp8", f"this GPU has compute capability {major}.{minor}, float8 needs "
                          ">= 8.9 (H100, L40S); use bf16")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("train.precision", "fp8", "float8 training uses torchao: pip install torchao; or use bf16")


def check_debug(cfg: TrainRunConfig) -> None:
    """NaN injection targets steps the run reaches."""
    late = [s for s in cfg.debug.inject_nan_at_steps if s > cfg.train.max_steps]
    if late:
        raise ConfigError("debug.inject_nan_at_steps", late,
                          f"beyond train.max_steps={cfg.train.max_steps}; pick earlier steps")


CROSS_GROUP_RULES = (check_sequence, check_batch, check_tensor_parallel, check_pipeline, check_device, check_debug)
"""Every rule that reads more than one group, in the order they are checked."""


def check_registered_names(cfg: TrainRunConfig) -> None:
    """Every component name in the config is registered (after importing ``run.plugins``)."""
    from trainrun import registry as r

    r.import_plugin_modules(cfg.run.plugins)
    named = [
        (r.MODELS, cfg.model.name), (r.OPTIMIZERS, cfg.optim.name), (r.LR_SCHEDULES, cfg.optim.schedule),
        (r.DATASETS, cfg.data.name), (r.STEP_EXECUTORS, cfg.train.step_executor), (r.EVALUATORS, cfg.eval.name),
        (r.INITIALIZERS, cfg.parallel.initializer),
    ]
    for registry, name in named:
        if name not in registry:
            raise ConfigError(registry.config_field, name,
                              f"not a registered {registry.kind}; registered: {', '.join(registry.names())}")
    for name in cfg.checkpoint.policies:
        r.CHECKPOINT_POLICIES.get_extra(name)
    for name in cfg.logging.sinks:
        r.METRIC_SINKS.get_extra(name)


def check_components(cfg: TrainRunConfig) -> None:
    """The selected components' own cheap checks: the step executor of the whole config (device, layout,
    precision, its own train.<executor> settings), then the dataset of its section (e.g. its directory)."""
    from trainrun import registry as r

    r.STEP_EXECUTORS.check(cfg.train.step_executor, cfg)
    for where, _source, section in source_sections(cfg.data):
        try:
            r.DATASETS.check(section.name, section)
        except (ConfigError, DataError) as err:
            if where == "data" or not err.field.startswith("data."):
                raise
            # The dataset's check names the single-dataset field (data.path); say which blend entry it was.
            field = f"{where}.{err.field.removeprefix('data.').replace('name', 'dataset')}"
            raise type(err)(field, err.value, err.fix) from None


def validate_config(cfg: TrainRunConfig, world_size: int | None = None) -> None:
    """Run every check that needs no model, no data read and no process group, each rule once.

    ``world_size`` defaults to what the launcher set (see :func:`expected_world_size`).
    """
    check_registered_names(cfg)
    for group in cfg.groups().values():
        if hasattr(group, "validate"):
            group.validate()
    check_world_size(cfg, expected_world_size(cfg) if world_size is None else world_size)
    for rule in CROSS_GROUP_RULES:
        rule(cfg)
    check_components(cfg)
