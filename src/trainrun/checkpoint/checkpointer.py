"""Gathers the training state into a checkpoint and restores it on resume."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

import trainrun
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config.errors import ConfigError
from trainrun.config.schema import ModelConfig, TrainRunConfig
from trainrun.train.state import TrainState

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("n_layers", "n_heads", "d_model", "ffn_hidden", "vocab_size", "norm", "position", "mlp",
              "tie_embeddings", "bias")
"""Model fields that change parameter shapes or meaning; a resume that changes them is refused."""


_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def config_hash(cfg: TrainRunConfig) -> str:
    """Short stable hash of the whole config (for the checkpoint's metadata)."""
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_model_compatible(saved: dict, current: ModelConfig, path: Path) -> None:
    """Refuse, before loading anything, a checkpoint whose model shape differs from the config."""
    for key in SHAPE_KEYS:
        if key in saved and saved[key] != getattr(current, key):
            raise ConfigError(
                f"model.{key}", getattr(current, key),
                f"checkpoint {path} has model.{key}={saved[key]!r}; set it back, or use checkpoint.resume=never",
            )


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(device)
    return rng


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data position, RNG and TrainState."""

    def __init__(self, cfg: TrainRunConfig, store: CheckpointStore, model_parts: list[nn.Module],
                 optimizers: list[torch.optim.Optimizer], scheduler, train_iter, state: TrainState,
                 device: torch.device, extra_meta: dict | None = None):
        """``model_parts[i]`` is trained by ``optimizers[i]`` (several parts: pipeline stages of this rank)."""
        self.cfg, self.store = cfg, store
        self.model_parts, self.optimizers, self.scheduler = model_parts, optimizers, scheduler
        self.train_iter, self.state, self.device = train_iter, state, device
        self.extra_meta = extra_meta or {}
        self.resumed_from: Path | None = None

    def _tensors(self, with_optimizer: bool) -> dict:
        # Fully-qualified names are the same in every layout (pipeline stages keep the full
        # model's names), so the flattened dicts of all parts merge into one and DCP reshards.
        model_sd: dict = {}
        optim_sd: dict = {}
        for part, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            part_model, part_optim = get_state_dict(part, optimizer, options=_OPTIONS)
            model_sd.update(part_model)
            optim_sd.update(part_optim)
        tensors: dict = {"model": model_sd}
        if with_optimizer:
            tensors["optim"] = optim_sd
            tensors["rng"] = _rng_tensors(self.device)
        return tensors

    def _meta(self) -> dict:
        return {
            "format": 1,
            "step": self.state.step,
            "train_state": self.state.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_iter.state_dict(),
            "model": asdict(self.cfg.model),
            "config": asdict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "versions": {"trainrun": trainrun.__version__, "torch": torch.__version__},
            **self.extra_meta,
        }

    def save(self) -> Path:
        """Save the current state as ``step_<N>`` and return its path."""
        return self.store.save(self.state.step, self._tensors(with_optimizer=True), self._meta())

    def resolve_resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for: auto (newest complete), never, or a path."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            return self.store.find_latest()
        return Path(resume)

    def resume(self) -> Path | None:
        """Restore from the configured checkpoint, if any; return its path."""
        path = self.resolve_resume_path()
        if path is None:
            return None
        meta = CheckpointStore.read_meta(path)
        check_model_compatible(meta["model"], self.cfg.model, path)
        full = self.cfg.checkpoint.load_optimizer
        tensors = self._tensors(with_optimizer=full)
        if full and "torch_cuda" in tensors["rng"] and meta["config"]["run"]["device"] == "cpu":
            tensors["rng"].pop("torch_cuda")
        self.store.load_tensors(path, tensors)
        for part, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            set_state_dict(
                part, optimizer if full else [],
                model_state_dict=tensors["model"], optim_state_dict=tensors.get("optim", {}),
                options=StateDictOptions(strict=False, flatten_optimizer_state_dict=True),
            )
        if full:
            torch.set_rng_state(tensors["rng"]["torch_cpu"])
            if "torch_cuda" in tensors["rng"]:
                torch.cuda.set_rng_state(tensors["rng"]["torch_cuda"], self.device)
            self.scheduler.load_state_dict(meta["scheduler"])
            self.train_iter.load_state_dict(meta["data"])
            self.state.load_state_dict(meta["train_state"])
        logger.info("resumed from %s (step %d%s)", path, meta["step"], "" if full else ", weights only")
        self.resumed_from = path
        return path
