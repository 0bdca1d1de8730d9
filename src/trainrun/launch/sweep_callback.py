"""Hydra callback around a sweep (-m): check every point before anything is launched, sum up after.

Before: each point's config is composed and validated (trainrun's own rules, the registry, the
dataset check, and the parallel degrees against the processes the launcher gives a job: nodes x
tasks_per_node under submitit, else 1), then the jobs' environment checks run for every point
(writable run, checkpoint and cache directories; wandb credentials). One bad point stops the whole
command with one line naming the point and the field, exit code 2, and nothing is queued
(:func:`preflight`; the Optuna sweeper runs the same checks on each trial before launching it).
Each job: a job that raised (a crash) is recorded as failed in its run directory, its traceback goes
to stderr and train.log, and its exit code 1 reaches the launcher like every other code; left alone,
Hydra would re-raise the exception after the batch and no summary would be printed.
After: one line per point, the same for every outcome (:func:`point_summary`: finished, crashed,
bad configuration, stopped early, non-finite steps; requeues; final validation loss), and an exit
code that is 0 only when every point finished (1 if any crashed, else the first other code).
Hydra's callbacks turn exceptions into warnings, so both decisions leave with ``SystemExit``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from trainrun.config.schema import TrainRunConfig
from trainrun.errors import ConfigError, DataError, UserError
from trainrun.exit_codes import ExitCode
from trainrun.extras import check_sweep_extras
from trainrun.launch.point import point_id
from trainrun.launch.run_status import STATUS_FILE, RunDirLock, read_status, record_status

logger = logging.getLogger(__name__)

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

OUTCOMES = {
    ExitCode.FINISHED: "finished",
    ExitCode.FAILED: "crashed",
    ExitCode.CONFIG_ERROR: "bad configuration",
    ExitCode.RESUME: "stopped early, resume me",
    ExitCode.BAD_STEPS: "non-finite steps",
}
"""How a point's exit code reads in the sweep summary (docs/checkpointing.md, "Exit codes")."""


def world_size_per_job(config: DictConfig) -> int:
    """Processes one job of this launcher runs: nodes x tasks_per_node under submitit, else WORLD_SIZE or 1."""
    launcher = config.hydra.launcher
    if "submitit" in str(launcher.get("_target_", "")):
        return int(launcher.get("nodes", 1) or 1) * int(launcher.get("tasks_per_node", 1) or 1)
    return int(os.environ.get("WORLD_SIZE", "1"))


def sweep_points(config: DictConfig) -> list[list[str]]:
    """The override list of every point the basic sweeper will launch (its own expansion rules)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)
    return [list(point) for batch in batches for point in batch]


def check_memory(cfg: TrainRunConfig) -> None:
    """The dry-run memory estimate per device fits ``run.device_memory_gib`` (when both are known)."""
    if cfg.run.device_memory_gib is None or cfg.model.vocab_size is None:
        return  # unknown device, or a vocabulary that only the dataset knows
    from trainrun.model.accounting import estimate_training_memory

    p = cfg.parallel
    need = estimate_training_memory(cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.precision,
                                    dp_shard=p.dp_shard, tp=p.tp, pp=p.pp,
                                    activation_checkpointing=p.activation_checkpointing).total / 2**30
    if need > cfg.run.device_memory_gib:
        raise ConfigError("train.micro_batch_size", cfg.train.micro_batch_size,
                          f"the estimated {need:.1f} GiB per device exceed run.device_memory_gib="
                          f"{cfg.run.device_memory_gib:g}; lower it, shard more (parallel.dp_shard, tp, pp) or "
                          "set parallel.activation_checkpointing")


def check_point(config: DictConfig, overrides: list[str], world_size: int) -> tuple[str, TrainRunConfig]:
    """Compose and validate one point as its job will; return its id and config. A ConfigError names the
    point and the field."""
    from hydra.core.global_hydra import GlobalHydra

    from trainrun.orchestrator import prepare_config  # the job's own first step, replayed here

    composed = GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    point = point_id(str(composed.hydra.job.override_dirname))  # the run directory the job will use
    with open_dict(composed):
        del composed["hydra"]
    try:
        cfg = prepare_config(composed, world_size=world_size)
        check_memory(cfg)
    except (ConfigError, DataError) as err:
        kind = DataError if isinstance(err, DataError) else ConfigError
        raise kind(f"sweep point {point} [{' '.join(overrides)}]: {err.field}", err.value, err.fix) from None
    return point, cfg


def check_point_environments(config: DictConfig, points: dict[str, TrainRunConfig]) -> None:
    """The jobs' start-up environment checks (``trainrun.preflight``), made once here before anything is queued:
    each point's run and checkpoint directories (under ``hydra.sweep.dir``) and the data cache are
    writable, and online wandb has credentials. The paths are the ones the jobs will use, on the file
    system a cluster shares with the submitting host. The credentials are left to the jobs when the
    launcher's ``setup`` lines mention wandb, since those give the jobs an environment this one lacks.
    """
    from trainrun.preflight import check_environment

    setup = " ".join(str(line) for line in (config.hydra.launcher.get("setup") or []))
    wandb_credentials = "WANDB" not in setup.upper()
    sweep_dir = Path(str(config.hydra.sweep.dir))
    for point, cfg in points.items():
        check_environment(cfg, sweep_dir / point, wandb_credentials=wandb_credentials,
                          run_dir_option="hydra.sweep.dir")


def preflight(config: DictConfig, points: Sequence[Sequence[str]], world_size: int,
              distinct: bool = True) -> list[tuple[str, TrainRunConfig]]:
    """Check every point (:func:`check_point`), then their environments; return each point's id and config.

    Every config is checked before any environment, so a bad one stops the sweep before any directory
    exists. ``distinct``: two points sharing a run directory are refused (a search may propose the same
    point twice on purpose). Raises ``ConfigError`` or ``RunEnvironmentError`` on the first bad point.
    """
    checked: list[tuple[str, TrainRunConfig]] = []
    seen: dict[str, list[str]] = {}
    for overrides in points:
        point, cfg = check_point(config, list(overrides), world_size)
        if distinct and point in seen:
            raise ConfigError(
                "hydra.sweeper", f"[{' '.join(seen[point])}] and [{' '.join(overrides)}]",
                f"these points share the run directory {point}: they differ only in keys that "
                "hydra.job.config.override_dirname.exclude_keys leaves out of a point's identity; "
                "sweep other keys")
        seen[point] = list(overrides)
        checked.append((point, cfg))
    check_point_environments(config, dict(checked))
    return checked


def refuse(err: UserError) -> NoReturn:
    """Print the one line of a pre-flight refusal (a config, data or environment error) and exit with its code."""
    print(err.line(), file=sys.stderr)
    raise SystemExit(err.exit_code) from None


def exit_code_of(status: dict) -> ExitCode:
    """The recorded exit code of a point (crashed when none was recorded: the job never reached its end)."""
    try:
        return ExitCode(int(status["exit_code"]))
    except (KeyError, TypeError, ValueError):
        return ExitCode.FAILED


def point_overrides(run_dir: Path, default: Sequence[str] = ()) -> list[str]:
    """The point's overrides as its job recorded them (``.hydra/overrides.yaml``), else ``default``."""
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        overrides = None
    return [str(o) for o in overrides] if isinstance(overrides, list) else list(default)


def point_summary(run_dir: Path, overrides: Sequence[str], common: Iterable[str] = ()) -> tuple[ExitCode, str]:
    """The point's exit code and its summary line, the same for every outcome: id, own overrides (those
    in ``common`` to all points left out), outcome, exit code, requeues, then the final validation loss
    or where to look. A point without a recorded outcome never reached its end: it counts as crashed."""
    from trainrun.observe.analysis import last_value, load_metrics  # trainrun.observe brings torch

    status = read_status(run_dir)
    code = exit_code_of(status)
    outcome = OUTCOMES.get(code, code.name.lower().replace("_", " ")) if status else "no outcome recorded"
    parts = [f"{outcome} (exit {int(code)})"]
    if status.get("requeues"):
        parts.append(f"requeued {status['requeues']} times")
    val_loss = last_value(load_metrics(run_dir), "val_loss")
    if val_loss is not None and code == ExitCode.FINISHED:
        parts.append(f"val_loss {val_loss:.4f}")
    elif code != ExitCode.FINISHED:
        parts.append(f"see {run_dir / 'train.log'}")
    skip = set(common)
    own = [o for o in overrides if o not in skip]
    return code, f"sweep point {run_dir.name} [{' '.join(own)}]: {', '.join(parts)}"


def sweep_summary(points: dict[Path, list[str]]) -> tuple[ExitCode, list[str]]:
    """The sweep's exit code (:func:`sweep_exit_code`) and one summary line per point (run dir -> its overrides)."""
    common = set.intersection(*map(set, points.values())) if len(points) > 1 else set()
    summaries = [point_summary(d, overrides, common) for d, overrides in sorted(points.items())]
    return sweep_exit_code(code for code, _ in summaries), [line for _, line in summaries]


def sweep_exit_code(codes: Iterable[ExitCode]) -> ExitCode:
    """0 when every point finished; 1 if any crashed; else the first other code (e.g. 3: resume me)."""
    worst = ExitCode.FINISHED
    for code in codes:
        if code != ExitCode.FINISHED and (worst == ExitCode.FINISHED or code == ExitCode.FAILED):
            worst = code
    return worst


def _is_rank0() -> bool:
    """This process is rank 0 of its job (torchrun's RANK, Slurm's SLURM_PROCID): the one that records status."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


class SweepCallback(Callback):
    """Pre-flight checks before a sweep, crashed jobs turned into exit codes, a summary after
    (configured in conf/hydra/default.yaml)."""

    def __init__(self) -> None:
        self._job_started = time.time()
        self._attempts_before = 0
        self._points: dict[str, list[str]] = {}

    def on_multirun_start(self, config: DictConfig, **_: Any) -> None:
        """Validate every point; exit 2 with one line on the first bad one, before any job is launched."""
        try:
            check_sweep_extras(config)  # before Hydra builds a sweeper or launcher whose package is missing
        except UserError as err:
            refuse(err)
        if str(config.hydra.sweeper.get("_target_", "")) != _BASIC_SWEEPER:
            return  # a search (the Optuna sweeper) chooses its points as it goes and checks each one itself
        world_size = world_size_per_job(config)
        points = sweep_points(config)
        try:
            checked = preflight(config, points, world_size)
        except UserError as err:
            refuse(err)
        self._points = {point: overrides for (point, _), overrides in zip(checked, points, strict=True)}
        print(f"trainrun: pre-flight: {len(points)} sweep point(s) compose, validate and have writable "
              f"directories for {world_size} process(es) per job", file=sys.stderr)

    def on_job_start(self, config: DictConfig, **_: Any) -> None:
        """Note when the job began and how many attempts its run directory had recorded before."""
        self._job_started = time.time()
        run_dir = Path(str(config.hydra.runtime.output_dir))
        self._attempts_before = len(read_status(run_dir).get("attempts", []))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **_: Any) -> None:
        """A sweep job that raised becomes a job that returned exit code 1, with its crash on record.

        The traceback goes to stderr and the point's train.log; the attempt is recorded as failed
        if the job did not get as far as recording it. Hydra's sweepers then see the code like any
        other, every point runs, and :meth:`on_multirun_end` sums them up. A single run keeps its
        exception (the entry point exits 1 with the traceback).
        """
        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return
        err = job_return._return_value
        run_dir = Path(str(config.hydra.runtime.output_dir))
        text = "".join(traceback.format_exception(err)) if isinstance(err, BaseException) else repr(err)
        print(text, file=sys.stderr, end="")
        print(f"trainrun: sweep point {run_dir.name} crashed: {type(err).__name__}: {err}", file=sys.stderr)
        if _is_rank0():
            try:
                with RunDirLock(run_dir):  # never write into a directory another live run holds
                    with open(run_dir / "train.log", "a", encoding="utf-8") as log:
                        log.write(f"sweep point crashed:\n{text}")
                    if len(read_status(run_dir).get("attempts", [])) == self._attempts_before:
                        record_status(run_dir, ExitCode.FAILED.name.lower(), int(ExitCode.FAILED), self._job_started)
            except (ConfigError, OSError) as record_err:  # the summary still says crashed: no outcome recorded
                logger.warning("could not record the crash in %s: %s", run_dir, record_err)
        job_return.status = JobStatus.COMPLETED
        job_return.return_value = int(ExitCode.FAILED)

    def on_multirun_end(self, config: DictConfig, **_: Any) -> None:
        """One line per point; exit non-zero unless every point of the sweep directory finished.

        Searches print the same lines for their trials and choose their exit code themselves.
        """
        if str(config.hydra.sweeper.get("_target_", "")) != _BASIC_SWEEPER:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        points = {sweep_dir / point: overrides for point, overrides in self._points.items()}
        for run_dir in sweep_dir.iterdir() if sweep_dir.is_dir() else ():  # points of earlier launches too
            if run_dir not in points and ((run_dir / ".hydra").is_dir() or (run_dir / STATUS_FILE).is_file()):
                points[run_dir] = []
        code, lines = sweep_summary({d: point_overrides(d, default) for d, default in points.items()})
        for line in lines:
            print(f"trainrun: {line}", file=sys.stderr)
        if code != ExitCode.FINISHED:
            raise SystemExit(code)
