"""Which checkpoint a start resumes from, and the refusals a user can cause, checked before anything is built.

* ``checkpoint.resume=auto``: this run's newest checkpoint that verifies (persistent and
  non-persistent merged by commit time), falling back over broken ones.
* ``checkpoint.resume=<path>`` and weights-only resumes (``load_optimizer=false``) apply to the first
  start only: its checkpoints record the request as their ``origin``, and a later start (a requeue)
  continues this run's own newest checkpoint with its full state.
* A run never starts from scratch over checkpoints it could not use, nor (``resume=never``) over
  checkpoints it would overwrite or prune.

Rank 0 alone lists and verifies; every rank gets its answer (:class:`ResumeChooser`). The
checkpointer loads what is chosen and makes the authoritative checks as it loads (every tensor's
shape, the data checksum); :func:`check_checkpoints_before_build` reads only ``trainrun.json``
files, so the refusals a user can cause arrive in seconds, before the model is built or a process
group waits on them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from trainrun.checkpoint.layout import CheckpointDir, is_checkpoint, read_meta
from trainrun.checkpoint.paths import (
    CheckpointNotFound,
    check_non_persistent_dir,
    checkpoint_dirs,
    checkpoints_in,
    find_checkpoint,
)
from trainrun.config.schema import CheckpointConfig, DataConfig, ModelConfig, TrainRunConfig
from trainrun.distributed.env import nodes_in_job
from trainrun.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("name", "n_layers", "n_heads", "d_model", "ffn_hidden", "vocab_size", "norm", "position", "mlp",
              "tie_embeddings", "bias")
"""Model fields that change parameter shapes or meaning; a resume that changes them is refused. (The
loader also compares every tensor's shape with the checkpoint's, for models with fields of their own.)"""

SHAPE_KEYS_LEARNED_POSITIONS = ("max_seq_len",)
"""Fields that size a parameter only with ``model.position=learned`` (the position table)."""

NEW_RUN_FIX = "train that model in a new run directory (hydra.run.dir=...)"


def shape_keys(model: ModelConfig) -> tuple[str, ...]:
    """The model fields that decide parameter shapes for this configuration."""
    learned = str(getattr(model.position, "value", model.position)) == "learned"
    return SHAPE_KEYS + (SHAPE_KEYS_LEARNED_POSITIONS if learned else ())


def check_model_compatible(saved: dict, current: ModelConfig, path: Path) -> None:
    """Refuse, before loading anything, a checkpoint whose model shape differs from the config."""
    for key in shape_keys(current):
        if key in saved and saved[key] != getattr(current, key):
            raise ConfigError(
                f"model.{key}", getattr(current, key),
                f"checkpoint {path} has model.{key}={saved[key]!r}; set it back, or {NEW_RUN_FIX}",
            )
    # n_kv_heads compares resolved (null means n_heads), so null and an explicit n_heads are the same model.
    saved_kv = saved.get("n_kv_heads") or saved.get("n_heads")
    if saved_kv is not None and saved_kv != current.kv_heads:
        raise ConfigError("model.n_kv_heads", current.n_kv_heads, f"checkpoint {path} has {saved_kv} key/value "
                          f"heads (model.n_kv_heads={saved.get('n_kv_heads')!r}); set it back, or {NEW_RUN_FIX}")


def origin_request(c: CheckpointConfig) -> dict | None:
    """What a first start asked for that a requeue must not repeat: an explicit path or weights only."""
    if c.resume == "never" or (c.resume == "auto" and c.load_optimizer):
        return None
    return {"resume": c.resume, "load_optimizer": c.load_optimizer}


class Candidate(NamedTuple):
    """A checkpoint a resume may load, in the order they are tried."""

    path: Path
    full: bool
    """Restore the full state (optimizer, schedule, data position, RNG, TrainState), not only the weights."""
    fallback: bool
    """If it fails to load, the next candidate may be tried (an explicit path has none)."""
    origin: dict | None
    """The branch's origin to record in its checkpoints; None: keep the checkpoint's own."""


class AgreedCheckpoint(NamedTuple):
    """A checkpoint outside ``dirs`` that every rank already agreed it can restore (a node-local step on
    several nodes, see :mod:`~trainrun.checkpoint.node_local`): rank 0 may not hold its files."""

    path: Path
    committed_unix: float
    meta: dict


class ResumeChooser:
    """Chooses, on rank 0, the checkpoint every rank resumes from, and the next one when it fails to load.

    ``dirs`` are this run's checkpoint directories (persistent first); ``agreed`` a node-local checkpoint,
    merged with them by commit time; ``share`` gives every rank rank 0's value and ``all_true`` is true on
    every rank when it is true on all (both the identity in one process).
    """

    def __init__(self, cfg: CheckpointConfig, dirs: list[CheckpointDir], is_rank0: bool = True,
                 share: Callable[[object], object] = lambda obj: obj,
                 all_true: Callable[[bool], bool] = lambda flag: flag, agreed: AgreedCheckpoint | None = None):
        self.cfg, self.dirs, self.agreed = cfg, dirs, agreed
        self.is_rank0, self.share, self.all_true = is_rank0, share, all_true

    def _meta(self, path: Path) -> dict:
        return self.agreed.meta if self.agreed is not None and path == self.agreed.path else read_meta(path)

    def resume(self, load: Callable[[Path, bool, dict | None], None]) -> Path | None:
        """Call ``load(path, full, origin)`` on every rank for the first candidate that loads; return its path.

        A checkpoint that verifies but fails to load (``load`` raises CheckpointError: a bit flip that
        size-only verification misses, damaged DCP metadata) is reported and the previous good one is
        tried, as for corrupt ones; an explicit path has nothing to fall back to (exit 2). Anything
        else ``load`` raises (a changed model shape, changed data) ends the resume: it is a
        configuration error, never a reason to fall back. None if there is nothing to resume.
        """
        candidates = self.candidates() if self.is_rank0 else None
        failures: list[str] = []
        while True:
            choice = self._next_choice(candidates)
            if "error" in choice:
                raise ConfigError(*choice["error"])
            if choice["path"] is None:
                self._refuse_fresh_start_over(failures)
                return None
            path = Path(choice["path"])
            problem = None
            try:
                load(path, choice["full"], choice["origin"])
            except CheckpointError as err:
                problem = str(err)
            if self.all_true(problem is None):
                return path
            problem = problem or "loading failed on another rank"
            if not choice["fallback"]:
                raise ConfigError("checkpoint.resume", str(path), f"{problem}; use another checkpoint or resume=never")
            failures.append(f"{path.name}: {problem}")
            logger.warning("checkpoint %s verified but failed to load (%s); falling back to the previous one",
                           path, problem)

    def candidates(self) -> Iterator[Candidate]:
        """The checkpoints to try, in order (this process's view; each is verified as it is reached).

        ``checkpoint.resume=<path>`` and weights-only resumes apply to the first start only: once this
        run committed a checkpoint on the branch they started (its ``origin`` records the request),
        every later start (a requeue) continues from this run's own newest checkpoint with its full
        state, instead of going back to the starting point forever.
        """
        c = self.cfg
        if c.resume == "never":
            return
        origin = origin_request(c)
        own = self.own_checkpoints()
        if origin is not None:
            newest = next(own, None)
            if newest is not None and self._meta(newest).get("origin") == origin:
                logger.info("continuing the branch this run started from %s (%s): resuming its newest checkpoint",
                            c.resume, "weights only" if not c.load_optimizer else "full state")
                yield from (Candidate(path, True, True, origin) for path in itertools.chain([newest], own))
                return
            if c.resume != "auto":
                yield Candidate(self._explicit_path(Path(c.resume)), c.load_optimizer, False, origin)
                return
            own = itertools.chain([] if newest is None else [newest], own)  # verified once, not again
        yield from (Candidate(path, c.load_optimizer, True, origin) for path in own)

    def own_checkpoints(self) -> Iterator[Path]:
        """This run's verified checkpoints (persistent and non-persistent), the one committed last first.

        The directories (and the agreed node-local checkpoint) are merged by commit time; a tie goes to the
        one listed first (the persistent one). A re-save killed between its two renames is undone first, or
        its step's only copy would be missed.
        """
        for directory in self.dirs:
            directory.recover()
        sources = [directory.verified() for directory in self.dirs]
        if self.agreed is not None:
            sources.append(iter([self.agreed.path]))

        def head(source: Iterator[Path]) -> tuple[Path, float] | None:
            path = next(source, None)
            if path is None:
                return None
            agreed = self.agreed is not None and path == self.agreed.path
            return path, self.agreed.committed_unix if agreed else read_meta(path).get("committed_unix", 0.0)

        heads = [head(src) for src in sources]
        while any(h is not None for h in heads):
            index = max((i for i, h in enumerate(heads) if h is not None), key=lambda i: (heads[i][1], -i))
            yield heads[index][0]
            heads[index] = head(sources[index])

    def _explicit_path(self, path: Path) -> Path:
        """``checkpoint.resume=<path>``: a checkpoint, or a checkpoint or run dir (its newest good checkpoint)."""
        try:
            return find_checkpoint(path, self.cfg.verify)
        except CheckpointNotFound as err:
            raise ConfigError("checkpoint.resume", str(path), str(err)) from None

    def _next_choice(self, candidates: Iterator[Candidate] | None) -> dict:
        """Rank 0 picks (and verifies) the next candidate; every rank gets the same answer."""
        choice: dict = {"path": None}
        if candidates is not None:
            try:
                found = next(candidates, None)
                if found is not None:
                    choice = {"path": str(found.path), "full": found.full, "fallback": found.fallback,
                              "origin": found.origin}
            except ConfigError as err:
                choice = {"error": [err.field, err.value, err.fix]}
        return self.share(choice)

    def _refuse_fresh_start_over(self, failures: list[str]) -> None:
        """With ``resume`` other than never and nothing loaded: refuse if this run's directories hold checkpoints.

        Starting from scratch would rank the new run's checkpoints as the newest and let retention
        delete the real ones.
        """
        if self.cfg.resume == "never":
            return
        existing = [str(p) for d in self.dirs for p in d.checkpoints()] if self.is_rank0 else None
        found = self.share(existing)
        if not found:
            return
        why = "; ".join(failures) if failures else "none verifies (see the warnings above)"
        raise CheckpointError(
            f"{len(found)} checkpoint(s) in {Path(found[0]).parent} could not be used ({why}); refusing to train "
            "from scratch over them. Repair or move them away, resume from a good copy with checkpoint.resume=<path>, "
            "or start in a new run directory (hydra.run.dir=...)")


# ---- before the model is built ------------------------------------------------------------------

def check_checkpoints_before_build(cfg: TrainRunConfig, run_dir: Path) -> None:
    """Refuse, with one line, a start that would overwrite other work or resume a checkpoint of another shape."""
    dirs = checkpoint_dirs(cfg, run_dir)
    if cfg.checkpoint.non_persistent_interval > 0:
        check_non_persistent_dir(dirs[1], dirs[0], nodes_in_job(), cfg.checkpoint.local_replicas)
    if cfg.checkpoint.resume == "never":
        refuse_fresh_start_over_checkpoints(dirs)
        return
    sources = dirs if cfg.checkpoint.resume == "auto" else [Path(cfg.checkpoint.resume), *dirs]
    found = newest_readable_meta(sources)
    if found is not None:
        meta, path = found
        check_model_compatible(meta.get("model", {}), cfg.model, path)
        if not cfg.data.allow_blend_change and isinstance(meta.get("data"), dict):
            check_blend_unchanged(meta["data"], cfg.data)


def refuse_fresh_start_over_checkpoints(dirs: list[Path]) -> None:
    """``checkpoint.resume=never`` where checkpoints exist: its saves would overwrite or prune them."""
    for directory in dirs:
        existing = CheckpointDir(directory).checkpoints()
        if existing:
            raise ConfigError(
                "checkpoint.resume", "never",
                f"{directory} already holds {len(existing)} checkpoint(s) of an earlier run (newest step "
                f"{existing[-1].name.removeprefix('step_')}), which this run's saves would overwrite or prune; "
                f"continue them with checkpoint.resume=auto, or {NEW_RUN_FIX}")


def newest_readable_meta(sources: list[Path]) -> tuple[dict, Path] | None:
    """The metadata of the newest checkpoint (commit order) with a readable ``trainrun.json`` among ``sources``
    (checkpoints, checkpoint directories or run directories, the likeliest first)."""
    for source in sources:
        candidates = [source] if is_checkpoint(source) else CheckpointDir(checkpoints_in(source)).in_commit_order()
        for path in candidates:
            try:
                return read_meta(path), path
            except (OSError, ValueError):
                continue  # damaged: the checkpointer reports it and falls back
    return None


def check_blend_unchanged(data_state: dict, data: DataConfig) -> None:
    """The checkpoint's blend is this run's (refused before the model is built, naming data.allow_blend_change)."""
    from trainrun.data.blend import refuse_blend_change
    from trainrun.data.sources import training_sources

    sources = [s for s in training_sources(data) if s.weight > 0]
    refuse_blend_change(data_state.get("blend"), [s.name for s in sources], [s.weight for s in sources],
                        int(data_state.get("consumed_samples", 0)))
