"""What a run will do with the checkpoints it finds, checked before anything expensive is built.

The checkpointer makes the authoritative checks when it loads (every tensor's shape, the data
checksum); these read only ``trainrun.json`` files so that the refusals a user can cause arrive in
seconds, before the model is built or a process group waits on them.
"""

from __future__ import annotations

from pathlib import Path

from trainrun.checkpoint.checkpointer import NEW_RUN_FIX, check_model_compatible, check_non_persistent_dir
from trainrun.checkpoint.store import META_FILE, CheckpointStore
from trainrun.config.errors import ConfigError
from trainrun.config.schema import TrainRunConfig
from trainrun.distributed.env import nodes_in_job
from trainrun.preflight import checkpoint_directories


def check_checkpoints_before_build(cfg: TrainRunConfig, run_dir: Path) -> None:
    """Refuse, with one line, a start that would overwrite other work or resume a checkpoint of another shape."""
    dirs = [path for path, _, _ in checkpoint_directories(cfg, run_dir)]
    if cfg.checkpoint.non_persistent_interval > 0:
        check_non_persistent_dir(dirs[1], dirs[0], nodes_in_job())
    if cfg.checkpoint.resume == "never":
        refuse_fresh_start_over_checkpoints(dirs)
        return
    found = newest_readable_meta(_resume_sources(cfg.checkpoint.resume, dirs))
    if found is not None:
        meta, path = found
        check_model_compatible(meta.get("model", {}), cfg.model, path)


def refuse_fresh_start_over_checkpoints(dirs: list[Path]) -> None:
    """``checkpoint.resume=never`` where checkpoints exist: its saves would overwrite or prune them."""
    for directory in dirs:
        existing = CheckpointStore(directory, 0, True, lambda: None).checkpoints()
        if existing:
            raise ConfigError(
                "checkpoint.resume", "never",
                f"{directory} already holds {len(existing)} checkpoint(s) of an earlier run (newest step "
                f"{existing[-1].name.removeprefix('step_')}), which this run's saves would overwrite or prune; "
                f"continue them with checkpoint.resume=auto, or {NEW_RUN_FIX}")


def _resume_sources(resume: str, dirs: list[Path]) -> list[Path]:
    """Checkpoint directories or checkpoints a resume may load from, the likeliest first."""
    return dirs if resume == "auto" else [Path(resume), *dirs]


def newest_readable_meta(sources: list[Path]) -> tuple[dict, Path] | None:
    """The metadata of the newest checkpoint (commit order) with a readable ``trainrun.json`` among ``sources``."""
    for source in sources:
        candidates = [source] if (source / META_FILE).is_file() else \
            CheckpointStore(source, 0, True, lambda: None).in_commit_order()
        for path in candidates:
            try:
                return CheckpointStore.read_meta(path), path
            except (OSError, ValueError):
                continue  # damaged: the checkpointer reports it and falls back
    return None

