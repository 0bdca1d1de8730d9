"""Where a run's checkpoints live: each rule written once, for the run, its start-up checks and its tools.

* persistent: ``checkpoint.dir``, else ``checkpoints/`` in the run directory;
* non-persistent: a per-run folder in ``checkpoint.non_persistent_dir``, else under the system temp dir,
  never the persistent directory nor inside it; on several nodes each node's own disk at that path;
* a path a user gives a tool (``checkpoint.resume``, ``trainrun-export``): a run directory stands
  for its ``checkpoints/``.

And which checkpoint such a path names (:func:`find_checkpoint`), for resuming and for export alike.
Plain paths, no torch: :mod:`trainrun.outputs` and the start-up checks read these rules too.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trainrun.checkpoint.layout import META_FILE, CheckpointDir, is_checkpoint, verify_checkpoint
from trainrun.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from trainrun.config.schema import TrainRunConfig

class CheckpointNotFound(CheckpointError):
    """A path that names no usable checkpoint (see :func:`find_checkpoint`); the message says why."""


RUN_CHECKPOINTS = "checkpoints"
"""The persistent checkpoint directory's name inside a run directory (when ``checkpoint.dir`` is unset)."""


def run_checkpoint_dir(run_dir: Path) -> Path:
    """The checkpoint directory a run directory holds by default."""
    return run_dir / RUN_CHECKPOINTS


def persistent_dir(cfg: TrainRunConfig, run_dir: Path) -> Path:
    """checkpoint.dir, or ``checkpoints/`` in the run directory."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_checkpoint_dir(run_dir)


def non_persistent_dir(cfg: TrainRunConfig, run_dir: Path) -> Path:
    """This run's own folder in checkpoint.non_persistent_dir (``run-<hash of the run dir>``), or under the system
    temp dir when that is unset.

    Runs sharing one fast disk never see each other's non-persistent checkpoints: a new run must not
    resume another run's state, nor prune it. A requeued or relaunched run has the same run directory,
    hence the same folder.
    """
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    if cfg.checkpoint.non_persistent_dir:
        return Path(cfg.checkpoint.non_persistent_dir) / f"run-{digest}"
    return Path(tempfile.gettempdir()) / "trainrun-nonpersistent" / digest


def checkpoint_dirs(cfg: TrainRunConfig, run_dir: Path) -> list[Path]:
    """Every directory this run saves checkpoints to: the persistent one, then the non-persistent one if used."""
    dirs = [persistent_dir(cfg, run_dir)]
    if cfg.checkpoint.non_persistent_interval > 0:
        dirs.append(non_persistent_dir(cfg, run_dir))
    return dirs


def check_non_persistent_dir(local_dir: Path, persistent: Path, nodes: int, replicas: int = 0) -> None:
    """Refuse non-persistent checkpoints where they cannot be correct.

    A non-persistent directory equal to or inside the persistent one would be pruned, listed and
    resumed as persistent checkpoints. ``checkpoint.local_replicas`` copies each node's files to that
    many other nodes, so it needs more nodes than that.
    """
    local, outer = local_dir.resolve(), persistent.resolve()
    if local == outer or outer in local.parents:
        raise ConfigError("checkpoint.non_persistent_dir", str(local_dir),
                          f"it is (inside) the persistent checkpoint directory {persistent}; "
                          "use a separate, preferably node-local, directory")
    if replicas > nodes - 1:
        raise ConfigError("checkpoint.local_replicas", replicas,
                          f"each node's non-persistent checkpoint can be copied to at most the {nodes - 1} other "
                          f"node(s) of this {nodes}-node job; set checkpoint.local_replicas<={nodes - 1}")


def checkpoints_in(path: Path) -> Path:
    """The checkpoint directory a user's path stands for: a run directory's ``checkpoints/``, else ``path``."""
    inside = run_checkpoint_dir(path)
    return inside if inside.is_dir() else path


def find_checkpoint(path: Path, verify: str, step: int | None = None, fall_back: bool = True) -> Path:
    """The checkpoint a user's ``path`` names, verified against its manifest.

    ``path`` may be a checkpoint (a ``step_<N>`` directory), a checkpoint directory or a run directory
    (its ``checkpoints/``). In a directory: ``step_<step>``, else the checkpoint committed last;
    ``fall_back`` skips broken ones (each reported) for the previous good one, otherwise a broken
    newest one is refused. Raises :class:`CheckpointNotFound` naming what is missing or broken.
    """
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist")
    directory = CheckpointDir(checkpoints_in(path), verify)
    single = is_checkpoint(path)
    found = [] if single else directory.checkpoints()
    if single:
        if step is not None and path.name != f"step_{step}":
            raise CheckpointNotFound(f"{path} is a single checkpoint; step {step} needs its parent directory")
        chosen = path
    elif not found:
        raise CheckpointNotFound(f"{path} holds no checkpoints (no step_<N> directories in {directory.path}) and is "
                                 f"none itself ({META_FILE} is missing)")
    elif step is not None:
        chosen = directory.step_dir(step)
        if not chosen.is_dir():
            available = ", ".join(p.name.removeprefix("step_") for p in found)
            raise CheckpointNotFound(f"{directory} has no checkpoint of step {step} (steps: {available})")
    elif fall_back:
        chosen = directory.find_latest()
        if chosen is None:
            raise CheckpointNotFound(f"{directory} holds no complete checkpoint (see the warnings above)")
        return chosen  # verified as it was chosen
    else:
        chosen = directory.newest_committed()
        if chosen is None:
            raise CheckpointNotFound(f"{directory} holds no committed checkpoint (none has {META_FILE})")
    problem = verify_checkpoint(chosen, verify)
    if problem is not None:
        raise CheckpointNotFound(f"checkpoint {chosen} is broken (not a complete trainrun checkpoint): {problem}")
    return chosen
