"""Gathers the training state into a checkpoint and restores it on resume.

Tensors (model, optimizer moments, RNG states) go to DCP; every other value (optimizer
hyper-parameters, LR schedule, data position, TrainState, config) goes to JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

import trainrun
from trainrun.checkpoint.policy import SaveKind
from trainrun.checkpoint.store import (
    LATEST_FILE,
    CheckpointError,
    CheckpointStore,
    verify_checkpoint,
)
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


def changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of config values that differ between the checkpoint and this run."""
    changed = []
    for key, value in current.items():
        name = f"{prefix}{key}"
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changed += changed_settings(old, value, name + ".")
        elif key in saved and old != value:
            changed.append(f"{name}: {old!r} -> {value!r}")
    return changed


def non_persistent_dir(cfg: TrainRunConfig, run_dir: Path) -> Path:
    """checkpoint.non_persistent_dir, or a per-run folder under the system temp dir."""
    if cfg.checkpoint.non_persistent_dir:
        return Path(cfg.checkpoint.non_persistent_dir)
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "trainrun-nonpersistent" / digest


def _split_tensors(flat: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if k not in tensors}
    return tensors, values


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data position, RNG and TrainState."""

    def __init__(self, cfg: TrainRunConfig, store: CheckpointStore, model_parts: list[nn.Module],
                 optimizers: list[torch.optim.Optimizer], scheduler, train_iter, state: TrainState,
                 device: torch.device, extra_meta: dict | None = None,
                 local_store: CheckpointStore | None = None):
        """``model_parts[i]`` is trained by ``optimizers[i]`` (several parts: pipeline stages of this rank)."""
        self.cfg, self.store, self.local_store = cfg, store, local_store
        self.model_parts, self.optimizers, self.scheduler = model_parts, optimizers, scheduler
        self.train_iter, self.state, self.device = train_iter, state, device
        self.extra_meta = extra_meta or {}
        self.resumed_from: Path | None = None
        self.last_save_time = time.monotonic()

    # ---- state gathering ----------------------------------------------------------------
    def _state(self, with_optimizer: bool) -> tuple[dict, dict]:
        # Fully-qualified names are the same in every layout (pipeline stages keep the full
        # model's names), so the flattened dicts of all parts merge into one and DCP reshards.
        model_sd: dict = {}
        optim_flat: dict = {}
        for part, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            if not with_optimizer:  # get_state_dict would initialise an empty optimizer's state (a step)
                model_sd.update(get_model_state_dict(part, options=_OPTIONS))
                continue
            part_model, part_optim = get_state_dict(part, optimizer, options=_OPTIONS)
            model_sd.update(part_model)
            optim_flat.update(part_optim)
        tensors: dict = {"model": model_sd}
        values: dict = {}
        if with_optimizer:
            tensors["optim"], values = _split_tensors(optim_flat)
            tensors["rng"] = {"torch_cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                tensors["rng"]["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors, values

    def _meta(self, optim_values: dict) -> dict:
        p = self.cfg.parallel
        return {
            "format": 1,
            "step": self.state.step,
            "consumed_tokens": self.state.consumed_tokens,
            "train_state": self.state.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_iter.state_dict(),
            "optim_values": optim_values,
            "model": asdict(self.cfg.model),
            "config": asdict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "layout": {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp},
            "versions": {"trainrun": trainrun.__version__, "torch": torch.__version__},
            **self.extra_meta,
        }

    # ---- saving ---------------------------------------------------------------------------
    def _protected(self) -> set[Path]:
        """Checkpoints retention must keep: the one resumed from and the best one."""
        protect = {self.resumed_from} if self.resumed_from else set()
        if self.state.best_checkpoint_step is not None:
            protect.add(self.store.step_dir(self.state.best_checkpoint_step))
        return protect

    def save(self, kind: SaveKind = SaveKind.PERSISTENT, blocking: bool | None = None) -> Path | None:
        """Save the current state; async (returns None until committed) when configured and not ``blocking``.

        A previous async save is committed first; if that one failed it is reported and this
        save still goes ahead. Raises CheckpointError when this save fails (nothing is left behind).
        """
        store = self.local_store if kind == SaveKind.NON_PERSISTENT and self.local_store else self.store
        try:
            self.finalize(blocking=True)
        except CheckpointError as err:
            logger.error("previous async checkpoint lost (older checkpoints intact): %s", err)
        tensors, values = self._state(with_optimizer=True)
        meta = {**self._meta(values), "kind": kind.value}
        self.last_save_time = time.monotonic()
        use_async = self.cfg.checkpoint.async_save if blocking is None else not blocking
        if use_async and store is self.store:
            store.save_async(self.state.step, tensors, meta, protect=self._protected())
            return None
        return store.save(self.state.step, tensors, meta, protect=self._protected())

    @property
    def pending(self) -> bool:
        """An async save is started and not yet committed."""
        return self.store.pending is not None

    def wait_for_staging(self) -> None:
        """Before parameters change: wait until a pending async save has copied them."""
        self.store.wait_for_staging()

    def finalize(self, blocking: bool) -> Path | None:
        """Commit a finished async save (all ranks agree); ``blocking`` waits for it."""
        return self.store.finalize(blocking, protect=self._protected())

    def close(self) -> None:
        """Commit any pending save and release resources."""
        self.store.close(protect=self._protected())

    # ---- resuming -------------------------------------------------------------------------
    def resolve_resume_path(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for: auto (newest good one), never, or a path."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume != "auto":
            return self._explicit_path(Path(resume))
        candidates = [s.find_latest() for s in (self.store, self.local_store) if s is not None]
        candidates = [c for c in candidates if c is not None]
        # Non-persistent checkpoints win when newer; a tie goes to the persistent one (listed first).
        best = max(candidates, key=lambda p: CheckpointStore.read_meta(p)["step"], default=None)
        if best is not None and self.local_store is not None and best.parent == self.local_store.directory:
            logger.info("the non-persistent checkpoint %s is the newest", best)
        return best

    def _explicit_path(self, path: Path) -> Path:
        """``checkpoint.resume=<path>``: a checkpoint, or a checkpoint dir (its newest good checkpoint)."""
        if (path / LATEST_FILE).is_file() or (path.is_dir() and any(path.glob("step_*"))):
            found = CheckpointStore(path, 0, True, lambda: None, self.cfg.checkpoint.verify).find_latest()
            if found is None:
                raise ConfigError("checkpoint.resume", str(path),
                                  "this checkpoint directory holds no complete checkpoint")
            return found
        problem = verify_checkpoint(path, self.cfg.checkpoint.verify)
        if problem is not None:
            raise ConfigError("checkpoint.resume", str(path), f"not a complete trainrun checkpoint: {problem}")
        return path

    def resume(self) -> Path | None:
        """Restore from the configured checkpoint, if any; return its path."""
        path = self.resolve_resume_path()
        if path is None:
            return None
        try:
            meta = CheckpointStore.read_meta(path)
        except (OSError, ValueError) as err:
            raise ConfigError("checkpoint.resume", str(path),
                              f"its {path / 'trainrun.json'} is unreadable ({err})") from err
        check_model_compatible(meta["model"], self.cfg.model, path)
        full = self.cfg.checkpoint.load_optimizer
        if full:  # a weights-only resume (fine-tuning) is meant for other data
            self._check_data_unchanged(meta, path)
        self._warn_changed(meta)
        tensors, _ = self._state(with_optimizer=full)
        if full and "torch_cuda" in tensors["rng"] and meta["config"]["run"]["device"] == "cpu":
            tensors["rng"].pop("torch_cuda")
        try:
            CheckpointStore.load_tensors(path, tensors)
        except CheckpointError as err:
            raise ConfigError("checkpoint.resume", str(path), f"{err}; use another checkpoint or resume=never") from err
        optim_flat = {**tensors.get("optim", {}), **meta.get("optim_values", {})} if full else {}
        for part, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            set_state_dict(part, optimizer if full else [], model_state_dict=tensors["model"],
                           optim_state_dict=optim_flat,
                           options=StateDictOptions(strict=False, flatten_optimizer_state_dict=True))
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

    def _check_data_unchanged(self, meta: dict, path: Path) -> None:
        """The dataset has the checksum the checkpoint recorded, or the user allowed the change."""
        saved, current = meta.get("data_checksum"), self.extra_meta.get("data_checksum")
        if saved is None or current is None or saved == current:
            return
        if not self.cfg.checkpoint.allow_data_change:
            raise ConfigError("checkpoint.allow_data_change", False,
                              f"the data changed since {path} was saved (checksum {saved[:12]} then, {current[:12]} "
                              "now), so its data position would continue on other data; restore the data, resume "
                              "with checkpoint.allow_data_change=true, or start over with checkpoint.resume=never")
        logger.warning("the data changed since %s was saved (checksum %s then, %s now); continuing its data "
                       "position on the new data (checkpoint.allow_data_change=true)", path, saved[:12], current[:12])

    def _warn_changed(self, meta: dict) -> None:
        current = asdict(self.cfg)
        changed = [c for c in changed_settings(meta.get("config", {}), current)
                   if not c.startswith(("run.output_dir", "checkpoint.resume"))]
        if changed:
            logger.warning("resuming with changed settings: %s", "; ".join(changed))
