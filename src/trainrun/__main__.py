"""``python -m trainrun``: Hydra composes the config; the orchestrator runs it.

Exit codes are those of :mod:`trainrun.exit_codes`; configuration errors (including Hydra's
own composition errors) and errors of the environment a user can fix (an unwritable directory,
missing wandb credentials; see :mod:`trainrun.preflight`) exit 2 with one line and no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from trainrun.cli_help import register_help_resolver
from trainrun.config import ConfigError, register_configs
from trainrun.config.convert import config_dir
from trainrun.config.store import normalize_overrides
from trainrun.config.validate import launcher_world_size
from trainrun.exit_codes import ExitCode
from trainrun.preflight import RunEnvironmentError, unwritable_dir_error
from trainrun.registry import UnknownComponentError

# torch and the components are imported inside _run_task: --help, --info and shell completion
# (a query per TAB) answer without paying for them.

_task_started = False


def _print_summary(result) -> None:
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    if result.final_eval:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in result.final_eval.items()))
    print(f"run directory: {result.run_dir.resolve()}")


def _run_task(cfg: DictConfig, run_dir: Path) -> int:
    """Run one job; return its exit code (errors a user can fix become one line on stderr)."""
    from trainrun import orchestrator
    from trainrun.checkpoint.store import CheckpointError

    try:
        result = orchestrator.run(cfg, run_dir=run_dir)
    except (ConfigError, UnknownComponentError) as err:
        print(f"trainrun: configuration error: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except RunEnvironmentError as err:
        print(f"trainrun: environment error: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except CheckpointError as err:
        print(f"trainrun: checkpoint error: {err}", file=sys.stderr)
        return ExitCode.FAILED
    if result.is_rank0:
        _print_summary(result)
    return int(result.exit_code)


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, Slurm's SLURM_PROCID)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def run_in_dir(cfg: DictConfig, run_dir: Path) -> int:
    """Run one job in ``run_dir``: rank 0 holds the directory's lock and records each attempt's outcome."""
    from trainrun.launch.run_status import RunDirLock, record_status

    if _launch_rank() != 0:
        return _run_task(cfg, run_dir)
    try:
        with RunDirLock(run_dir):
            code, started = ExitCode.FAILED, time.time()
            try:
                code = _run_task(cfg, run_dir)
            finally:
                record_status(run_dir, ExitCode(code).name.lower(), int(code), started)
    except ConfigError as err:  # the directory is locked by another run
        print(f"trainrun: configuration error: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    return code


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> int:
    """Run the composed config. A single run exits with its code; in a sweep (-m) each job returns
    its code to the launcher so one failing job does not end the others, a point that finished in
    an earlier launch of the same sweep is skipped, and a submitit job that stopped early to be
    resumed (code 3) is requeued instead of reported."""
    from trainrun.launch.run_status import is_finished
    from trainrun.launch.slurm_requeue import in_submitit_job, requeue_this_job

    global _task_started
    _task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and is_finished(run_dir):
        print(f"trainrun: sweep point {run_dir.name} ({hydra_cfg.job.override_dirname or 'no overrides'}) "
              f"finished in an earlier launch; skipping it", file=sys.stderr)
        return ExitCode.FINISHED
    code = run_in_dir(cfg, run_dir)
    if code == ExitCode.RESUME and in_submitit_job():
        # Returning would write submitit's result file and end the job for good; leaving without
        # one after `scontrol requeue` is what submitit's own preemption handler does.
        requeue_this_job()
        raise SystemExit(code)
    if not multirun and launcher_world_size() > 1 and not in_submitit_job():
        _exit_rank_now(code)
    if not multirun and code != ExitCode.FINISHED:
        sys.exit(code)
    return code


def _exit_rank_now(code: int) -> None:
    """End a finished rank of a multi-process run without interpreter teardown.

    The process group is destroyed and every sink closed by now. What is left are Gloo's C++
    threads, which can still hold tensors with Python references; destroying those while the
    interpreter finalizes intermittently aborts the process ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#179291), and torchrun then reports the whole finished run
    as failed. Not used in a sweep or a submitit job, whose launchers still have work after us.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def _causes(err: BaseException) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def composition_error_line(err: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing: the field, then what is wrong.

    Hydra's own report spans several lines and lists the internal ``base_*`` schema entries.
    """
    for cause in _causes(err):
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            return f"{cause.full_key}: {str(cause).splitlines()[0]}"
        if isinstance(cause, MissingConfigException):
            options = [o for o in (cause.options or []) if not o.startswith("base_")]
            first = str(cause).strip().splitlines()[0]
            return f"{first}; available: {', '.join(options)}" if options else first
    return " ".join(str(err).split())


def main() -> None:
    """Console entry point."""
    register_configs()
    register_help_resolver()
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    # conf/hydra/launcher/submitit_*.yaml keep the names users know and are typed by the plugin's
    # schemas of the same name; Hydra validates them that way and warns that it is deprecated.
    warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_\w+' is validated against ConfigStore")
    # Without this Hydra prints composition errors over several lines itself and exits 1; with it
    # they reach us, and every configuration error gets the same one line and exit code 2.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_entry()
    except (HydraException, OmegaConfBaseException, ConfigError, UnknownComponentError) as err:
        if _task_started:
            raise  # a crash inside the run: the traceback matters, exit code 1
        print(f"trainrun: configuration error: {composition_error_line(err)}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG_ERROR)
    except OSError as err:
        if _task_started or err.filename is None:
            raise
        # Before our task runs, Hydra only creates the run (or sweep) directory and writes .hydra/ into it.
        option = "hydra.sweep.dir" if {"-m", "--multirun"} & set(sys.argv[1:]) else "hydra.run.dir"
        print(f"trainrun: environment error: {unwritable_dir_error(option, err.filename, err)}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG_ERROR)


if __name__ == "__main__":
    main()
