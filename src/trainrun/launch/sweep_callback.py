"""Hydra callback around a sweep (-m): check every point before anything is launched, sum up after.

Before: each point's config is composed and validated (trainrun's own rules, the registry, the
dataset check, and the parallel degrees against the processes the launcher gives a job: nodes x
tasks_per_node under submitit, else 1), then the jobs' environment checks run for every point
(writable run, checkpoint and cache directories; wandb credentials). One bad point stops the whole
command with one line naming the point and the field, exit code 2, and nothing is queued. After:
one line per point (status, requeues, final validation loss) and an exit code that is 0 only when every point finished.
Hydra's callbacks turn exceptions into warnings, so both decisions leave with ``SystemExit``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from trainrun.config.errors import ConfigError
from trainrun.config.schema import TrainRunConfig
from trainrun.exit_codes import ExitCode
from trainrun.launch.point import point_id
from trainrun.launch.run_status import read_status

logger = logging.getLogger(__name__)

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def launcher_world_size(config: DictConfig) -> int:
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

    from trainrun.config.convert import to_dataclass
    from trainrun.config.validate import validate_config

    composed = GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    point = point_id(str(composed.hydra.job.override_dirname))  # the run directory the job will use
    with open_dict(composed):
        del composed["hydra"]
    try:
        cfg = to_dataclass(composed)
        validate_config(cfg, world_size=world_size)
        check_memory(cfg)
    except ConfigError as err:
        raise ConfigError(f"sweep point {point} [{' '.join(overrides)}]: {err.field}", err.value, err.fix) from None
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
        check_environment(cfg, sweep_dir / point, wandb_credentials=wandb_credentials)


class SweepCallback(Callback):
    """Pre-flight checks before a sweep and a summary after it (configured in conf/hydra/default.yaml)."""

    def on_multirun_start(self, config: DictConfig, **_: Any) -> None:
        """Validate every point; exit 2 with one line on the first bad one, before any job is launched."""
        if str(config.hydra.sweeper.get("_target_", "")) != _BASIC_SWEEPER:
            return  # other sweepers (Optuna) choose their points as they go
        from trainrun.preflight import RunEnvironmentError

        world_size = launcher_world_size(config)
        points = sweep_points(config)
        seen: dict[str, list[str]] = {}
        configs: dict[str, TrainRunConfig] = {}
        try:
            for overrides in points:  # every config first: a bad one stops the sweep before any directory exists
                point, configs[point] = check_point(config, overrides, world_size)
                if point in seen:
                    raise ConfigError(
                        "hydra.sweeper", f"[{' '.join(seen[point])}] and [{' '.join(overrides)}]",
                        f"these points share the run directory {point}: they differ only in keys that "
                        "hydra.job.config.override_dirname.exclude_keys leaves out of a point's identity; "
                        "sweep other keys")
                seen[point] = overrides
            check_point_environments(config, configs)
        except ConfigError as err:
            print(f"trainrun: configuration error: {err}", file=sys.stderr)
            raise SystemExit(ExitCode.CONFIG_ERROR) from None
        except RunEnvironmentError as err:
            print(f"trainrun: environment error: {err}", file=sys.stderr)
            raise SystemExit(ExitCode.CONFIG_ERROR) from None
        print(f"trainrun: pre-flight: {len(points)} sweep point(s) compose, validate and have writable "
              f"directories for {world_size} process(es) per job", file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **_: Any) -> None:
        """One line per point; exit non-zero unless every point of the sweep directory finished.

        Searches (other sweepers) expect failed trials: their summary is the sweeper's own.
        """
        if str(config.hydra.sweeper.get("_target_", "")) != _BASIC_SWEEPER:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = [(p.name, read_status(p)) for p in sorted(sweep_dir.iterdir()) if (p / ".hydra").is_dir()]
        worst = ExitCode.FINISHED
        for name, status in rows:
            code = ExitCode(int(status.get("exit_code", ExitCode.FAILED)))
            if code != ExitCode.FINISHED and (worst == ExitCode.FINISHED or code == ExitCode.FAILED):
                worst = code
            print(f"trainrun: sweep point {name}: {status.get('status', 'unknown')}"
                  f" (requeued {status.get('requeues', 0)} times)", file=sys.stderr)
        if worst != ExitCode.FINISHED:
            raise SystemExit(worst)
