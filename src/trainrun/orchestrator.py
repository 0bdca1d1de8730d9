"""Wires the configured components together and runs them; owns nothing else.

:func:`run` reads as the run's steps, in order: initialise the environment, build data, model and
optimizer, restore a checkpoint, run the loop, then evaluate, save and sample at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from trainrun import registry
from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.exit_controller import ExitController
from trainrun.checkpoint.node_local import NodeLocalStore
from trainrun.checkpoint.paths import non_persistent_dir, persistent_dir
from trainrun.checkpoint.policy import build_policy
from trainrun.checkpoint.resume import check_checkpoints_before_build
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config import TrainRunConfig, to_dataclass, validate_config
from trainrun.config.choices import Precision
from trainrun.data import DataSources, build_train_iterator, open_sources
from trainrun.data.blend import BlendSchedule
from trainrun.data.index_cache import CachedEpochOrder, prepare_epoch_orders
from trainrun.distributed.env import DistEnv, nodes_in_job
from trainrun.distributed.health import HealthMonitor, NoHealthMonitor
from trainrun.distributed.initializers import describe
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.distributed.parallelize import parallelize
from trainrun.distributed.pipeline import Pipeline, pipeline_eval_loss
from trainrun.dry_run import dry_run_report
from trainrun.errors import ConfigError, RunEnvironmentError
from trainrun.eval.sample import sample_text
from trainrun.exit_codes import ExitCode
from trainrun.hf.config import resolve_init_from
from trainrun.model import allocate, flops_per_token, materialize
from trainrun.model.float8 import convert_to_float8
from trainrun.observe import build_metric_logger, peak_flops_per_device, setup_logging
from trainrun.observe.profiler import StepProfiler
from trainrun.optim import build_lr_scheduler, param_group_summary
from trainrun.optim.schedules import SchedulerGroup
from trainrun.preflight import check_environment, run_directory
from trainrun.state import TrainState
from trainrun.train.debug_hooks import RepeatedBatches, install_nan_injection
from trainrun.train.loop import LoopComponents, TrainingLoop

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced, for the CLI summary and for tests."""

    exit_code: ExitCode
    run_dir: Path
    state: TrainState = field(default_factory=TrainState)
    final_eval: dict[str, float] = field(default_factory=dict)
    sample: str | None = None
    resumed_from: Path | None = None
    is_rank0: bool = True
    """Only rank 0 prints the summary of a multi-process run."""


def resolve_run_dir(cfg: TrainRunConfig, run_dir: Path | None) -> Path:
    """The caller's (Hydra's) run dir, else the current directory; created."""
    path = run_directory(run_dir)[0]
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_vocab(cfg: TrainRunConfig, dataset: DataSources) -> TrainRunConfig:
    """Fill model.vocab_size from the data, or check that the configured one covers it."""
    vocab = cfg.model.vocab_size
    if vocab is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=dataset.vocab_size))
    if vocab < dataset.vocab_size and cfg.model.init_from:
        raise ConfigError("model.init_from", cfg.model.init_from,
                          f"its vocabulary has {vocab} ids but the data at {dataset.path} uses {dataset.vocab_size}; "
                          "tokenize the data with that model's tokenizer (trainrun-prepare --tokenizer <its dir>)")
    if vocab < dataset.vocab_size:
        raise ConfigError("model.vocab_size", vocab,
                          f"the dataset needs at least {dataset.vocab_size}; raise it or set null")
    return cfg


@dataclass
class ModelAndOptimizer:
    """This rank's model parts, one optimizer per part, their (shared) LR schedule, and the pipeline if any."""

    model_parts: list[torch.nn.Module]
    """Pipeline stages of this rank (one: the whole, possibly sharded, model)."""
    optimizers: list[torch.optim.Optimizer]
    scheduler: object
    pipeline: Pipeline | None = None


def build_model_and_optimizer(cfg: TrainRunConfig, env: DistEnv, dims: ParallelDims | None = None) -> ModelAndOptimizer:
    """Build the model on meta, materialise it, parallelise it for ``dims``, then optimizers and LR schedules.

    With several processes only the shards are allocated; rank 0 then draws the model's parameters
    one at a time from the run seed in host memory and sends each to the ranks that hold a piece of
    it (see ``trainrun.distributed.parallelize``), so every layout starts from the weights a
    one-process CPU run starts from and no process holds more than its shards plus one parameter.
    With ``model.init_from`` no random weights are drawn at all: each rank allocates its shards and
    fills every parameter from the Hugging Face model's files.
    """
    from_pretrained = bool(cfg.model.init_from)

    def build_on(device: torch.device | str) -> torch.nn.Module:
        with torch.device("meta"):
            meta_model = registry.MODELS.get(cfg.model.name)(cfg.model)
        if cfg.train.precision is Precision.fp8 and device != "cpu":  # the CPU copy only seeds the weights
            meta_model = convert_to_float8(meta_model)  # same parameter names: checkpoints are unchanged
        if device == "meta":
            return meta_model
        return allocate(meta_model, device) if from_pretrained else materialize(meta_model, device)

    if dims is not None and dims.world_size > 1:
        model = build_on("meta")
        n_params = sum(p.numel() for p in model.parameters())
        parallel = parallelize(model, cfg, dims, env.device,
                               build_full=None if from_pretrained else lambda: build_on("cpu"))
        parts, pipeline = parallel.parts, parallel.pipeline
    else:
        model = build_on(env.device)
        n_params = sum(p.numel() for p in model.parameters())
        parts, pipeline = [model], None
    if cfg.model.init_from:  # after parallelising: each rank reads only its own shards
        from trainrun.hf.import_weights import load_hf_weights

        load_hf_weights(parts, cfg.model)
    optimizers = [registry.OPTIMIZERS.get(cfg.optim.name)(part, cfg.optim, env.device.type) for part in parts]
    schedulers = [build_lr_scheduler(opt, cfg.optim, cfg.train.max_steps) for opt in optimizers]
    scheduler = schedulers[0] if len(schedulers) == 1 else SchedulerGroup(schedulers)
    logger.info("model: %s parameters; optimizer: %s", f"{n_params:,}", param_group_summary(optimizers[0]))
    return ModelAndOptimizer(parts, optimizers, scheduler, pipeline)


def build_executor_and_eval_loss(cfg: TrainRunConfig, env: DistEnv, built: ModelAndOptimizer):
    """The configured step executor, and the evaluator's forward+loss (None: the model's own).

    Under ``parallel.pp>1`` (where validation let only an executor that runs stages through, ``pipeline``)
    the executor gets the ``Pipeline`` and one optimizer per stage; otherwise the model and its optimizer.
    """
    build = registry.STEP_EXECUTORS.get(cfg.train.step_executor)
    if built.pipeline is None:
        return build(built.model_parts[0], built.optimizers[0], built.scheduler, cfg, env.device), None
    pipe = built.pipeline
    # (B, T/tp, C) under SP; B from the batch: an evaluation's last micro-batch may be short
    width = (cfg.data.seq_len // cfg.parallel.tp, cfg.model.d_model)
    return (build(pipe, built.optimizers, built.scheduler, cfg, env.device),
            lambda x, y: pipeline_eval_loss(pipe, x, y, (x.shape[0], *width), env.device))


def build_checkpointer(cfg: TrainRunConfig, env: DistEnv, run_dir: Path, model_parts, optimizers, scheduler,
                       train_iter, state: TrainState, extra_meta: dict) -> Checkpointer:
    """The persistent store (checkpoint.dir or <run dir>/checkpoints), the non-persistent one (on several
    nodes: each node's own directory), and their checkpointer."""
    c = cfg.checkpoint

    def store(directory: Path, keep_last: int) -> CheckpointStore:
        return CheckpointStore(directory, keep_last, env.is_rank0, env.barrier, c.verify, env.all_true)

    persistent = store(persistent_dir(cfg, run_dir), c.keep_last)
    local: CheckpointStore | NodeLocalStore | None = None
    if c.non_persistent_interval > 0 and nodes_in_job() > 1:
        local = NodeLocalStore(non_persistent_dir(cfg, run_dir), env, c.verify, c.local_replicas)
    elif c.non_persistent_interval > 0:
        local = store(non_persistent_dir(cfg, run_dir), 1)
    return Checkpointer(cfg, persistent, model_parts, optimizers, scheduler, train_iter, state, env.device,
                        extra_meta=extra_meta, local_store=local, share=env.broadcast_object)


def prepare_config(cfg: TrainRunConfig | DictConfig, world_size: int | None = None) -> TrainRunConfig:
    """The typed config, completed from the files it names, then validated: the first step of every run.

    The config layer reads no file, so what a setting points at is read here, before validation
    checks what depends on it: ``model.init_from``'s config.json sets the model's shape.
    ``world_size``: as for :func:`~trainrun.config.validate_config` (a sweep's pre-flight passes the jobs').
    """
    cfg = to_dataclass(cfg)
    if cfg.model.init_from is not None:
        cfg = dataclasses.replace(cfg, model=resolve_init_from(cfg.model))
    validate_config(cfg, world_size)
    return cfg


def run(cfg: TrainRunConfig | DictConfig, run_dir: Path | None = None) -> RunResult:
    """Validate ``cfg`` and run training (or the dry run) in this process; return what happened."""
    cfg = prepare_config(cfg)
    # On every rank and before the process group: a refusal here can leave no peer waiting.
    check_environment(cfg, run_dir)
    run_dir = resolve_run_dir(cfg, run_dir)
    env: DistEnv = registry.INITIALIZERS.get(cfg.parallel.initializer)(cfg)
    clean, health = False, NoHealthMonitor()
    try:
        setup_logging(cfg.logging.level, env.rank, cfg.logging.all_ranks, run_dir / "train.log")
        logger.info(describe(env))
        health = HealthMonitor.start(cfg.parallel, env, run_dir)
        dataset = open_sources(cfg.data)
        logger.info("data: %s (vocab %d, checksum %s)", dataset.path, dataset.vocab_size, dataset.checksum[:16])
        if len(dataset.train) > 1 or dataset.split is not None or dataset.test:
            logger.info("data blend: %s", dataset.describe())
        cfg = resolve_vocab(cfg, dataset)
        if not cfg.run.dry_run:
            check_checkpoints_before_build(cfg, run_dir)
        if cfg.run.dry_run:
            logger.info("dry run:\n%s", dry_run_report(cfg))
            result = RunResult(ExitCode.FINISHED, run_dir, is_rank0=env.is_rank0)
        else:
            result = _train(cfg, env, dataset, run_dir, health)
        clean = True
        return result
    except Exception as err:
        lost = health.explain(err)  # a lost peer: a PeerLostError naming it (None: another error)
        if lost is None:
            raise
        raise lost from err
    finally:
        health.stop("done" if clean else "failed")  # before the process group goes
        env.close(clean)


def build_training_loop(cfg: TrainRunConfig, env: DistEnv, dataset: DataSources, run_dir: Path,
                        exit_controller: ExitController | None = None,
                        health: HealthMonitor | NoHealthMonitor | None = None) -> TrainingLoop:
    """Build model, optimizer, data iterator, evaluator, checkpointing and sinks; restore a checkpoint."""
    dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)
    dims.build_mesh(env.device.type)
    metrics = build_metrics_on_every_rank(cfg, env, run_dir)
    built = build_model_and_optimizer(cfg, env, dims)
    # Data is sharded by data-parallel rank only: TP and PP peers of one dp rank read the same batches.
    train_iter = build_train_iterator(dataset, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.run.seed,
                                      dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                                      allow_blend_change=cfg.data.allow_blend_change,
                                      orders=build_epoch_orders(cfg, env, dataset))
    if cfg.debug.overfit_batches:
        train_iter = RepeatedBatches(train_iter, cfg.debug.overfit_batches)
    state = TrainState()
    install_nan_injection(built.model_parts, state, cfg.debug.inject_nan_at_steps)
    checkpointer = build_checkpointer(cfg, env, run_dir, built.model_parts, built.optimizers, built.scheduler,
                                      train_iter, state,
                                      extra_meta={"data_checksum": dataset.checksum,
                                                  "data_sources": dataset.source_checksums(),
                                                  "world_size": env.world_size})
    checkpointer.resume()
    metrics.log_config({**dataclasses.asdict(cfg), "data_checksum": dataset.checksum})
    peak, peak_note = peak_flops_per_device(env.device, cfg.logging.peak_tflops, cfg.train.precision)
    logger.info("MFU is relative to %.3g FLOP/s per device (%s)", peak, peak_note)
    executor, eval_loss = build_executor_and_eval_loss(cfg, env, built)
    parts = LoopComponents(
        model_parts=built.model_parts,
        executor=executor,
        train_iter=train_iter,
        evaluator=registry.EVALUATORS.get(cfg.eval.name)(cfg, built.model_parts, dataset, env, dims.dp_rank, eval_loss),
        checkpointer=checkpointer,
        policy=build_policy(cfg.checkpoint),
        metrics=metrics,
        state=state,
        profiler=StepProfiler(run_dir, cfg.debug.profile_steps, cfg.debug.profile_wait_steps, env.rank,
                              env.device.type, memory_snapshot=cfg.debug.memory_snapshot),
        health=health or NoHealthMonitor(),
    )
    return TrainingLoop(cfg, env, parts, flops_per_token(cfg.model, cfg.data.seq_len), peak, exit_controller)


def build_epoch_orders(cfg: TrainRunConfig, env: DistEnv, data: DataSources) -> list[CachedEpochOrder | None]:
    """Each training source's per-epoch shuffles for the whole run, built once by one rank into
    ``paths.cache_dir`` and memory-mapped by every rank (:mod:`trainrun.data.index_cache`)."""
    seq_len, root = cfg.data.seq_len, Path(cfg.paths.cache_dir).expanduser()
    run_samples = cfg.train.max_steps * cfg.train.global_batch_size
    counts = BlendSchedule([v.weight for v in data.train]).counts_before(run_samples)
    orders: list[CachedEpochOrder | None] = []
    needs = []
    for view, count in zip(data.train, counts, strict=True):
        num_samples = view.num_samples(seq_len)
        if num_samples == 0:  # the stream refuses it, naming data.seq_len
            orders.append(None)
            continue
        order = CachedEpochOrder(root, {**view.identity(), "seq_len": seq_len}, num_samples, cfg.run.seed)
        orders.append(order)
        needs.append((order, max(1, -(-count // num_samples))))
    prepare_epoch_orders(needs, env)
    return orders


def build_metrics_on_every_rank(cfg: TrainRunConfig, env: DistEnv, run_dir: Path):
    """The metric sinks (rank 0 opens them), before the model is built; every rank learns if opening failed.

    Opening can fail on rank 0 alone (wandb online and its server unreachable): the other ranks must
    stop too instead of waiting for rank 0 in the first step's collectives.
    """
    metrics, error = None, None
    try:
        metrics = build_metric_logger(cfg.logging, run_dir, env.is_rank0)
    except RunEnvironmentError as err:
        error = err
    if not env.all_true(error is None):
        if metrics is not None:
            metrics.close()
        raise error or RunEnvironmentError("opening the metric sinks failed on rank 0", str(run_dir),
                                           "see rank 0's message")
    return metrics


def _train(cfg: TrainRunConfig, env: DistEnv, dataset: DataSources, run_dir: Path,
           health: HealthMonitor | NoHealthMonitor) -> RunResult:
    # Stop signals are caught from here on, so one that arrives while the model is built or a
    # checkpoint is loaded stops the run at the first step boundary instead of half way through.
    with ExitController(cfg, env, start_step=0) as exit_controller:
        loop = build_training_loop(cfg, env, dataset, run_dir, exit_controller, health)
        try:
            code = loop.run()
        finally:
            loop.components.metrics.close()
    state = loop.state
    result = RunResult(code, run_dir, state, resumed_from=loop.components.checkpointer.resumed_from,
                       is_rank0=env.is_rank0)
    if code == ExitCode.FINISHED and state.last_val_loss is not None:
        result.final_eval = {"val_loss": state.last_val_loss, **loop.final_eval}
    # Sampling runs on rank 0 alone, so only with an unsharded model (one process or pure DDP).
    p = cfg.parallel
    unsharded = p.dp_shard == 1 and p.tp == 1 and p.pp == 1
    if code == ExitCode.FINISHED and env.is_rank0 and cfg.eval.sample_tokens > 0 and unsharded:
        result.sample = sample_text(loop.components.model_parts[0], dataset.tokenizer, cfg.eval.sample_prompt,
                                    cfg.eval.sample_tokens, cfg.eval.temperature, cfg.eval.top_k, cfg.run.seed,
                                    env.device)
    return result
