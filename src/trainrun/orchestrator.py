"""Wires the configured components together and runs them; owns nothing else.

The steps read like DESIGN.md's list: initialise the environment, build data, model and
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
from trainrun.checkpoint import Checkpointer, CheckpointStore
from trainrun.config import ConfigError, TrainRunConfig, to_dataclass, validate_config
from trainrun.config.validate import data_parallel_size
from trainrun.data import TokenDataset, build_train_iterator
from trainrun.distributed.env import DistEnv
from trainrun.distributed.initializers import describe
from trainrun.dry_run import dry_run_report
from trainrun.eval.sample import sample_text
from trainrun.exit_codes import ExitCode
from trainrun.model import flops_per_token, materialize
from trainrun.observe import build_metric_logger, peak_flops_per_device, setup_logging
from trainrun.optim import build_lr_scheduler, param_group_summary
from trainrun.train.loop import LoopComponents, TrainingLoop
from trainrun.train.state import TrainState

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


def resolve_run_dir(cfg: TrainRunConfig, run_dir: Path | None) -> Path:
    """run.output_dir, else the caller's (Hydra's) run dir, else the current directory."""
    path = Path(cfg.run.output_dir) if cfg.run.output_dir else (run_dir or Path.cwd())
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_vocab(cfg: TrainRunConfig, dataset: TokenDataset) -> TrainRunConfig:
    """Fill model.vocab_size from the data, or check that the configured one covers it."""
    vocab = cfg.model.vocab_size
    if vocab is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=dataset.vocab_size))
    if vocab < dataset.vocab_size:
        raise ConfigError("model.vocab_size", vocab, f"the dataset needs at least {dataset.vocab_size}; raise it or set null")
    return cfg


def build_model_and_optimizer(cfg: TrainRunConfig, env: DistEnv):
    """Build the model on the meta device, materialise it on the target device, then its optimizer and LR schedule."""
    with torch.device("meta"):
        model = registry.MODELS.get(cfg.model.name)(cfg.model)
    model = materialize(model, env.device)
    optimizer = registry.OPTIMIZERS.get(cfg.optim.name)(model, cfg.optim, env.device.type)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    logger.info("model: %s parameters; optimizer: %s", f"{sum(p.numel() for p in model.parameters()):,}",
                param_group_summary(optimizer))
    return model, optimizer, scheduler


def _checkpoint_dir(cfg: TrainRunConfig, run_dir: Path) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def run(cfg: TrainRunConfig | DictConfig, run_dir: Path | None = None) -> RunResult:
    """Validate ``cfg`` and run training (or the dry run) in this process; return what happened."""
    cfg = to_dataclass(cfg)
    validate_config(cfg)
    run_dir = resolve_run_dir(cfg, run_dir)
    env: DistEnv = registry.INITIALIZERS.get(cfg.parallel.initializer)(cfg)
    try:
        setup_logging(cfg.logging.level, env.rank, cfg.logging.all_ranks, run_dir / "train.log")
        logger.info(describe(env))
        dataset: TokenDataset = registry.DATASETS.get(cfg.data.name)(cfg.data)
        logger.info("data: %s (vocab %d, checksum %s)", dataset.path, dataset.vocab_size, dataset.checksum[:16])
        cfg = resolve_vocab(cfg, dataset)
        if cfg.run.dry_run:
            logger.info("dry run:\n%s", dry_run_report(cfg))
            return RunResult(ExitCode.FINISHED, run_dir)
        return _train(cfg, env, dataset, run_dir)
    finally:
        env.close()


def build_training_loop(cfg: TrainRunConfig, env: DistEnv, dataset: TokenDataset, run_dir: Path) -> TrainingLoop:
    """Build model, optimizer, data iterator, evaluator, checkpointing and sinks; restore a checkpoint."""
    model, optimizer, scheduler = build_model_and_optimizer(cfg, env)
    dp_size = data_parallel_size(cfg)
    train_iter = build_train_iterator(dataset, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.run.seed,
                                      dp_rank=env.rank % dp_size, dp_size=dp_size)
    state = TrainState()
    store = CheckpointStore(_checkpoint_dir(cfg, run_dir), cfg.checkpoint.keep_last, env.is_rank0, env.barrier)
    checkpointer = Checkpointer(cfg, store, [model], [optimizer], scheduler, train_iter, state, env.device,
                                extra_meta={"data_checksum": dataset.checksum, "world_size": env.world_size})
    checkpointer.resume()
    metrics = build_metric_logger(cfg.logging, run_dir, env.is_rank0)
    metrics.log_config({**dataclasses.asdict(cfg), "data_checksum": dataset.checksum})
    peak, peak_note = peak_flops_per_device(env.device, cfg.logging.peak_tflops, cfg.train.precision)
    logger.info("MFU is relative to %.3g FLOP/s per device (%s)", peak, peak_note)
    parts = LoopComponents(
        model_parts=[model],
        executor=registry.STEP_EXECUTORS.get(cfg.train.step_executor)(model, optimizer, scheduler, cfg, env.device),
        train_iter=train_iter,
        evaluator=registry.EVALUATORS.get(cfg.eval.name)(cfg, model, dataset, env),
        checkpointer=checkpointer,
        policy=registry.CHECKPOINT_POLICIES.get(cfg.checkpoint.policy)(cfg.checkpoint),
        metrics=metrics,
        state=state,
    )
    return TrainingLoop(cfg, env, parts, flops_per_token(cfg.model, cfg.data.seq_len), peak)


def _train(cfg: TrainRunConfig, env: DistEnv, dataset: TokenDataset, run_dir: Path) -> RunResult:
    loop = build_training_loop(cfg, env, dataset, run_dir)
    try:
        code = loop.run()
    finally:
        loop.parts.metrics.close()
    state = loop.state
    result = RunResult(code, run_dir, state, resumed_from=loop.parts.checkpointer.resumed_from)
    if code == ExitCode.FINISHED and state.last_val_loss is not None:
        result.final_eval = {"val_loss": state.last_val_loss}
    if code == ExitCode.FINISHED and env.is_rank0 and cfg.eval.sample_tokens > 0:
        result.sample = sample_text(loop.parts.model_parts[0], dataset.tokenizer, cfg.eval.sample_prompt, cfg.eval.sample_tokens,
                                    cfg.eval.temperature, cfg.eval.top_k, cfg.run.seed, env.device)
    return result
