"""Gathers the training state into a checkpoint and restores it on resume.

Tensors (model, optimizer moments, RNG states) go to DCP; every other value (optimizer
hyper-parameters, LR schedule, data position, TrainState, config) goes to JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
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
from trainrun.checkpoint.dcp_io import CheckpointMismatch, load_tensors
from trainrun.checkpoint.layout import META_FILE, read_meta
from trainrun.checkpoint.node_local import LocalPlan, NodeLocalStore
from trainrun.checkpoint.policy import SaveKind
from trainrun.checkpoint.resume import (
    NEW_RUN_FIX,
    AgreedCheckpoint,
    ResumeChooser,
    check_model_compatible,
    origin_request,
)
from trainrun.checkpoint.separate_qkv import SeparateQkvCheckpoint, fused_optim_values
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config.choices import OptimizerImpl
from trainrun.config.schema import TrainRunConfig
from trainrun.errors import CheckpointError, ConfigError
from trainrun.optim.schedules import schedule_state
from trainrun.state import TrainState

logger = logging.getLogger(__name__)

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def config_hash(cfg: TrainRunConfig) -> str:
    """Short stable hash of the whole config (for the checkpoint's metadata)."""
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state_layout_fields(cfg: TrainRunConfig) -> dict[str, object]:
    """Dotted name -> value of the settings that decide which tensors a checkpoint holds and their shapes."""
    fields = {f"model.{key}": value for key, value in asdict(cfg.model).items() if key != "init_from"}
    fields["optim.name"] = cfg.optim.name
    return fields


def mismatch_error(err: CheckpointError, saved_config: dict, current: TrainRunConfig, path: Path) -> ConfigError:
    """A configuration error for an intact checkpoint that does not fit: the model (or optimizer) settings that
    differ, else the tensors."""
    differ = []
    for name, value in _state_layout_fields(current).items():
        section, key = name.split(".", 1)
        saved = saved_config.get(section, {})
        if key in saved and saved[key] != value:
            differ.append((name, saved[key]))
    field_name = differ[0][0] if differ else "checkpoint.resume"
    changed = ", ".join(f"{name}={old!r}" for name, old in differ[:4]) or "another model or optimizer"
    return ConfigError(field_name, "changed", f"{err} (the checkpoint has {changed}); set it back, or {NEW_RUN_FIX}")


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


def _split_tensors(flat: dict) -> tuple[dict, dict]:
    """A flattened optimizer state dict as (tensors for DCP, JSON values for trainrun.json).

    A param-group hyperparameter held in a tensor (the LR of a compiled or graph-captured optimizer,
    see ``optim.tensor_state.lr_as_tensor``) is saved as its float, so the checkpoint does not depend on
    how the run held it.
    """
    tensors, values = {}, {}
    for key, value in flat.items():
        if key.startswith("param_groups.") and isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            values[key] = list(value) if isinstance(value, tuple) else value
    return tensors, values


_IMPLEMENTATION_FLAGS = (OptimizerImpl.foreach.value, OptimizerImpl.fused.value, "capturable", "differentiable")
"""Param-group entries that say how an optimizer runs, not what it learned: a resumed run keeps its own.
(``optim.implementation``'s values are also the names of AdamW's flags.)"""


def _implementation_flags(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: group[k] for k in _IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]


class Checkpointer:
    """Saves and restores model, optimizer, LR schedule, data position, RNG and TrainState."""

    def __init__(self, cfg: TrainRunConfig, store: CheckpointStore, model_parts: list[nn.Module],
                 optimizers: list[torch.optim.Optimizer], scheduler, train_iter, state: TrainState,
                 device: torch.device, extra_meta: dict | None = None,
                 local_store: CheckpointStore | NodeLocalStore | None = None,
                 share: Callable[[object], object] = lambda obj: obj):
        """``model_parts[i]`` is trained by ``optimizers[i]`` (several parts: pipeline stages of this rank);
        ``local_store``: the non-persistent checkpoints (one node: a directory like the persistent one; several:
        each node's own, see :mod:`~trainrun.checkpoint.node_local`); ``share`` gives every rank rank 0's value
        (a broadcast; identity in one process)."""
        self.cfg, self.store, self.local_store = cfg, store, local_store
        self.model_parts, self.optimizers, self.scheduler = model_parts, optimizers, scheduler
        self.train_iter, self.state, self.device = train_iter, state, device
        self.extra_meta = extra_meta or {}
        self.resumed_from: Path | None = None
        self.last_persistent_save_time = time.monotonic()
        """When the last persistent save started (or the run): the time policy counts from it."""
        self.share, self.is_rank0, self.all_true = share, store.is_rank0, store.all_true
        self.origin = origin_request(cfg.checkpoint)
        """The first-start request (explicit path, weights only) that began this branch; saved in its checkpoints."""
        self._local_plan: LocalPlan | None = None
        """The node-local step every rank agreed it can restore (several nodes), if any."""
        self._pending_best: int | None = None
        self._clock_before_pending = self.last_persistent_save_time

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

    def _layout(self) -> dict:
        p = self.cfg.parallel
        return {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "tp": p.tp, "pp": p.pp}

    def _meta(self, optim_values: dict) -> dict:
        return {
            "format": 1,
            "step": self.state.step,
            "consumed_tokens": self.state.consumed_tokens,
            "train_state": self.state.state_dict(),
            "scheduler": schedule_state(self.scheduler),
            "data": self.train_iter.state_dict(),
            "optim_values": optim_values,
            "model": asdict(self.cfg.model),
            "config": asdict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "layout": self._layout(),
            "versions": {"trainrun": trainrun.__version__, "torch": torch.__version__},
            "origin": self.origin,
            **self.extra_meta,
        }

    # ---- saving ---------------------------------------------------------------------------
    def _protected(self) -> set[Path]:
        """Checkpoints retention must keep: the one resumed from and the best one."""
        protect = {self.resumed_from} if self.resumed_from else set()
        if self.state.best_checkpoint_step is not None:
            protect.add(self.store.step_dir(self.state.best_checkpoint_step))
        return protect

    def save(self, kind: SaveKind = SaveKind.PERSISTENT, blocking: bool | None = None,
             best: bool = False, exit_save: bool = False) -> Path | None:
        """Save the current state; async (returns None until committed) when configured and not ``blocking``.

        A previous async save is committed first; if that one failed it is reported and this
        save still goes ahead. Raises CheckpointError when this save fails (nothing is left behind).
        ``best``: this (persistent) checkpoint holds the best validation loss so far; it becomes
        ``best_checkpoint_step`` (and retention's protected one) only once it is committed.
        ``exit_save``: the save before stopping early; its manifest follows ``checkpoint.exit_verify``.
        """
        store = self.local_store if kind == SaveKind.NON_PERSISTENT and self.local_store else self.store
        try:
            self.finalize(blocking=True)
        except CheckpointError as err:
            logger.error("previous async checkpoint lost (older checkpoints intact): %s", err)
        best = best and store is self.store
        tensors, values = self._state(with_optimizer=True)
        meta = {**self._meta(values), "kind": kind.value}
        if best:  # whoever loads this checkpoint finds it committed, hence a valid best
            meta["train_state"] = {**meta["train_state"], "best_checkpoint_step": self.state.step}
        started = time.monotonic()
        use_async = self.cfg.checkpoint.async_save if blocking is None else not blocking
        if use_async and store is self.store:
            store.save_async(self.state.step, tensors, meta, protect=self._protected())
            self._pending_best = self.state.step if best else None
            # Counted from now, or the time policy would ask again every step until the commit; a
            # failed commit gives the clock back (finalize).
            self._clock_before_pending, self.last_persistent_save_time = self.last_persistent_save_time, started
            return None
        verify = self.cfg.checkpoint.exit_verify if exit_save else None
        path = store.save(self.state.step, tensors, meta, protect=self._protected(),
                          verify=None if verify is None else str(verify))
        if store is self.store:  # only a persistent save that landed stands in for the time policy's
            self.last_persistent_save_time = started
        if best:
            self.state.best_checkpoint_step = self.state.step
        return path

    @property
    def pending(self) -> bool:
        """An async save is started and not yet committed."""
        return self.store.pending is not None

    def wait_for_staging(self) -> None:
        """Before parameters change: wait until a pending async save has copied them."""
        self.store.wait_for_staging()

    def finalize(self, blocking: bool) -> Path | None:
        """Commit a finished async save (all ranks agree); ``blocking`` waits for it."""
        step = self.store.pending.step if self.store.pending is not None else None
        try:
            path = self.store.finalize(blocking, protect=self._protected())
        except CheckpointError:
            self._pending_best = None
            self.last_persistent_save_time = self._clock_before_pending
            raise
        if path is not None:
            if self._pending_best == step:
                self.state.best_checkpoint_step = step
            self._pending_best = None
        return path

    def close(self) -> None:
        """Commit any pending save and release resources."""
        try:
            self.finalize(blocking=True)
        finally:
            self.store.close(protect=self._protected())

    # ---- resuming -------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Restore from the checkpoint the :class:`~trainrun.checkpoint.resume.ResumeChooser` picks; return its path.

        Every rank loads the checkpoint rank 0 chose, so all ranks resume the same step; None if
        there is nothing to resume.
        """
        agreed = None
        if isinstance(self.local_store, NodeLocalStore):  # every rank says which node-local steps it can restore
            dirs = [self.store.directory]
            if self.cfg.checkpoint.resume != "never":
                self._local_plan = self.local_store.agree(self._layout())
            if self._local_plan is not None:
                agreed = AgreedCheckpoint(self._local_plan.path, self._local_plan.committed, self._local_plan.meta)
        else:
            dirs = [s.directory for s in (self.store, self.local_store) if s is not None]
        chooser = ResumeChooser(self.cfg.checkpoint, dirs, self.is_rank0, self.share, self.all_true, agreed)
        path = chooser.resume(self._load)
        if path is not None:
            self.resumed_from = path
        return path

    def _load(self, path: Path, full: bool, origin: dict | None) -> None:
        """Load ``path`` into the model (and, ``full``, optimizer, schedule, data position, RNG, TrainState)."""
        plan = self._local_plan if self._local_plan is not None and path == self._local_plan.path else None
        try:
            meta = plan.meta if plan is not None else read_meta(path)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"its {path / META_FILE} is unreadable ({err})") from err
        check_model_compatible(meta["model"], self.cfg.model, path)
        if full:  # a weights-only resume (fine-tuning) is meant for other data
            self._check_data_unchanged(meta, path)
        self._warn_changed(meta)
        tensors, _ = self._state(with_optimizer=full)
        if full and "torch_cuda" in tensors["rng"] and meta["config"]["run"]["device"] == "cpu":
            tensors["rng"].pop("torch_cuda")
        try:
            if plan is not None:
                self.local_store.load(plan, tensors)
            else:
                load_tensors(path, tensors, qkv_groups=self.cfg.model.kv_heads)
        except SeparateQkvCheckpoint as err:  # an older trainrun's layout: one line naming what to do
            raise ConfigError("checkpoint.resume", str(path), str(err)) from err
        except CheckpointMismatch as err:  # intact but not this model: no fallback (see resume)
            raise mismatch_error(err, meta.get("config", {"model": meta["model"]}), self.cfg, path) from err
        optim_flat = {**tensors.get("optim", {}), **fused_optim_values(meta.get("optim_values", {}))} if full else {}
        for part, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            # A checkpoint saved under another executor or optim.implementation (foreach, fused, a
            # captured graph) loads into this run's optimizer as this run configured it.
            flags = _implementation_flags(optimizer)
            set_state_dict(part, optimizer if full else [], model_state_dict=tensors["model"],
                           optim_state_dict=optim_flat,
                           options=StateDictOptions(strict=False, flatten_optimizer_state_dict=True))
            for group, own in zip(optimizer.param_groups, flags, strict=True):
                group.update(own)
        if full:
            torch.set_rng_state(tensors["rng"]["torch_cpu"])
            if "torch_cuda" in tensors["rng"]:
                torch.cuda.set_rng_state(tensors["rng"]["torch_cuda"], self.device)
            self.scheduler.load_state_dict(meta["scheduler"])
            self.train_iter.load_state_dict(meta["data"])
            self.state.load_state_dict(meta["train_state"])
        # Checkpoints of this branch carry the request that started it (see ResumeChooser.candidates).
        self.origin = origin if origin is not None else meta.get("origin")
        logger.info("resumed from %s (step %d%s)", path, meta["step"], "" if full else ", weights only")

    def _check_data_unchanged(self, meta: dict, path: Path) -> None:
        """The dataset has the checksum the checkpoint recorded, or the user allowed the change."""
        saved, current = meta.get("data_checksum"), self.extra_meta.get("data_checksum")
        if saved is None or current is None or saved == current:
            return
        if self.cfg.data.allow_blend_change and _same_shared_sources(meta.get("data_sources"),
                                                                     self.extra_meta.get("data_sources")):
            return  # the blend's sources changed (allowed, and logged by the data loader), not their data
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
                   if not c.startswith("checkpoint.resume")]
        if changed:
            logger.warning("resuming with changed settings: %s", "; ".join(changed))


def _same_shared_sources(saved: dict | None, current: dict | None) -> bool:
    """Every blend source both runs read has the same checksum in both (sources may come and go)."""
    if not saved or not current:
        return False
    return all(saved[name] == checksum for name, checksum in current.items() if name in saved)
