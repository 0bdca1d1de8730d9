"""Start-up checks of the environment a run depends on, made before anything expensive is built.

:func:`trainrun.config.validate_config` checks the config's values; this module checks what they
point at: the directories the run will write (run directory, checkpoint directories, the bundled
corpus cache) and, for ``logging.wandb.mode=online``, that wandb has credentials. A problem raises
:class:`RunEnvironmentError`, which the CLI prints as one line (``trainrun: environment error:
<what>: <path>; <fix>``) with exit code 2, instead of a traceback minutes into the run.

Online wandb without credentials is refused rather than quietly switched to offline: on a cluster a
run that logs nowhere is found out only after it has finished.

Every rank runs :func:`check_environment` itself, before the process group exists, so no rank can
fail a check while its peers wait in a collective. The ranks reach the same verdict: the paths come
from the config, identical on every rank, and lie on the file system the ranks share; the one
node-local default (the non-persistent checkpoint dir under the system temp dir) is allowed on a
single node only; the wandb credentials come from the environment the launcher hands every rank
(and a HOME that clusters share). Were one node still to refuse alone, its ranks would exit before
the rendezvous, which the launcher reports as a failed start, not a hang in the middle of training.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from pathlib import Path

from trainrun.checkpoint.paths import RUN_CHECKPOINTS, checkpoint_dirs
from trainrun.config.blend import source_sections
from trainrun.config.choices import WandbMode
from trainrun.config.schema import TrainRunConfig, WandbConfig
from trainrun.errors import ConfigError, RunEnvironmentError, first_line
from trainrun.extras import check_run_extras


def unwritable_dir_error(option: str, path: str | os.PathLike, err: OSError, note: str = "") -> RunEnvironmentError:
    """The error for directory ``path``, set by ``option`` (``note``: where its default came from), that
    could not be created or written."""
    path = Path(path)
    reason = "exists and is not a directory" if path.exists() and not path.is_dir() else (err.strerror or str(err))
    label = f"{option} ({note})" if note else option
    return RunEnvironmentError(f"{label} is not writable ({reason})", str(path),
                               f"set {option} to a directory you can write to")


def check_writable_dir(path: Path, option: str, note: str = "") -> None:
    """Create ``path`` (with parents) and write and delete a probe file in it; raise naming ``option`` if that fails.

    Permission bits are not consulted: ``os.access`` answers wrongly on some network file systems
    and for root, so only an actual write tells.
    """
    # Unique per process: all ranks probe the same shared directory at the same moment.
    probe = path / f".trainrun-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")  # a full or over-quota file system accepts the create but not the data
        finally:
            os.close(fd)
    except OSError as err:
        raise unwritable_dir_error(option, path, err, note) from None
    finally:
        with suppress(OSError):
            probe.unlink()


def run_directory(run_dir: Path | None, option: str = "hydra.run.dir") -> tuple[Path, str, str]:
    """The run directory ``orchestrator.resolve_run_dir`` will use, the option setting it, a note on its default.

    It is Hydra's ``hydra.run.dir`` (one per sweep point), resolved once by the entry point, which
    locks it before anything is written; a caller of ``orchestrator.run`` without Hydra passes its
    own or runs in the current directory.
    """
    if run_dir is not None:
        return run_dir, option, ""
    return Path.cwd(), option, "unset: the current directory"


def checkpoint_directories(cfg: TrainRunConfig, run_dir: Path) -> list[tuple[Path, str, str]]:
    """Every directory this run may save checkpoints to: (path, the option that sets it, a note on its default)."""
    c = cfg.checkpoint
    notes = [("checkpoint.dir", "" if c.dir else f"null: <run dir>/{RUN_CHECKPOINTS}"),
             ("checkpoint.non_persistent_dir", "" if c.non_persistent_dir else "null: under the system temp dir")]
    return [(path, option, note) for path, (option, note) in zip(checkpoint_dirs(cfg, run_dir), notes, strict=False)]


def check_data_cache(cfg: TrainRunConfig) -> None:
    """The directories the configured dataset will write are writable (its registered ``writes`` hook).

    The ``stdlib`` corpus names its cache unless the corpus is already built there; an indexed dataset is
    only read (``validate_config`` has already checked that its directory is complete).
    """
    from trainrun.registry import DATASETS

    for where, _source, section in source_sections(cfg.data):
        for path, option, note in DATASETS.written_dirs(section.name, section):
            check_writable_dir(path, option if where == "data" else f"{where}.path", note)


def check_wandb_credentials(cfg: WandbConfig) -> None:
    """For online wandb: an API key is configured (WANDB_API_KEY, ``wandb login``'s netrc entry, wandb settings).

    Looked up with wandb's own helper and never verified against the server, so no network is used;
    an unreachable server or a rejected key is reported when the run opens its wandb run.
    """
    if not cfg.enabled or cfg.mode is not WandbMode.online:
        return
    from trainrun.observe.wandb_sink import WANDB_OFFLINE_FIX  # here: observe/ imports torch, the CLI's --help must not

    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session
    except ImportError:  # a wandb without this helper: the sink turns wandb.init's own error into one line
        return
    host = str(wandb_setup.singleton().settings.base_url)
    try:
        auth = authenticate_session(host=host, source="trainrun", prompt=False, update_session=False)
    except AuthenticationError as err:
        raise RunEnvironmentError(f"wandb credentials are invalid ({first_line(err)})", host,
                                  f"fix WANDB_API_KEY or run `wandb login --relogin`, {WANDB_OFFLINE_FIX}") from None
    if auth is None:
        raise RunEnvironmentError("logging.wandb.mode=online but no wandb API key is configured for the server", host,
                                  f"set WANDB_API_KEY or run `wandb login`, {WANDB_OFFLINE_FIX}")


def check_paths_exist(cfg: TrainRunConfig) -> None:
    """The paths a config reads from are of the right kind: ``data.path`` not a file, a resume path a directory.

    Made here, not while the config is validated: turning a config into a dataclass touches no file.
    """
    for where, source, _section in source_sections(cfg.data):
        if source.path is not None and Path(source.path).expanduser().is_file():
            field = "data.path" if where == "data" else f"{where}.path"
            raise ConfigError(field, source.path, "is a file; it must be a dataset (or cache) directory")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        raise ConfigError("checkpoint.resume", resume,
                          "use auto, never, or the path of an existing checkpoint, checkpoint directory or run "
                          "directory")


def check_environment(cfg: TrainRunConfig, run_dir: Path | None, wandb_credentials: bool = True,
                      run_dir_option: str = "hydra.run.dir") -> None:
    """Every start-up check of the environment, cheapest first; raise :class:`RunEnvironmentError` on the first problem.

    ``run_dir`` is the caller's (Hydra's) run directory, as passed to ``orchestrator.run``. A dry run
    writes only its log, so it checks the run directory and the data cache alone.
    ``wandb_credentials=False`` leaves out the wandb check (a sweep's pre-flight, when the jobs' setup
    lines give them credentials this process does not have). ``run_dir_option``: the setting a user
    changes to move ``run_dir`` (``hydra.sweep.dir`` for a sweep point, whose directory lies under it).
    """
    check_paths_exist(cfg)
    path, option, note = run_directory(run_dir, run_dir_option)
    check_writable_dir(path, option, note)
    if not cfg.run.dry_run:
        check_run_extras(cfg)  # a package a chosen feature needs
        if wandb_credentials:
            check_wandb_credentials(cfg.logging.wandb)
        for directory, dir_option, dir_note in checkpoint_directories(cfg, path):
            check_writable_dir(directory, dir_option, dir_note)
    check_data_cache(cfg)
