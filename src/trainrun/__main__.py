"""``python -m trainrun``: Hydra composes the config; the orchestrator runs it.

Exit codes are those of :mod:`trainrun.exit_codes`. An error a user can fix (the kinds of
:mod:`trainrun.errors`: configuration, including Hydra's own composition errors; environment;
data; checkpoint) is one line on stderr, ``trainrun: <kind> error: ...``, with no traceback, and
exits with its kind's code. A lost peer (:func:`trainrun.distributed.health.is_peer_failure`) is one
logged line, ``peer lost: <which rank and host>; ...``, and exit code 5.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainrun.cli_help import register_help_resolver
from trainrun.config import register_configs
from trainrun.config.convert import config_dir
from trainrun.config.store import normalize_overrides
from trainrun.config.validate import launcher_world_size
from trainrun.errors import UserError
from trainrun.exit_codes import ExitCode
from trainrun.preflight import unwritable_dir_error

# torch and the components are imported inside _run_task: --help, --info and shell completion
# (a query per TAB) answer without paying for them.

_task_started = False


def _print_summary(result) -> None:
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    if result.final_eval:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in result.final_eval.items()))
    print(f"run directory: {result.run_dir.resolve()}")


def _report(err: UserError) -> int:
    """Print a user-fixable error as its kind's one line on stderr; return the kind's exit code."""
    print(err.line(), file=sys.stderr)
    return err.exit_code


def _report_peer_loss(err: BaseException) -> int:
    """Log the one line naming the lost peer (stderr on every rank, train.log on rank 0); return PEER_LOST."""
    from trainrun.distributed.health import peer_lost_line

    logging.getLogger("trainrun.distributed.health").error(peer_lost_line(err))
    return ExitCode.PEER_LOST


def _run_task(cfg, run_dir: Path) -> int:
    """Run one job; return its exit code (errors a user can fix become one line on stderr)."""
    from trainrun import orchestrator
    from trainrun.distributed.health import is_peer_failure

    try:
        result = orchestrator.run(cfg, run_dir=run_dir)
    except Exception as err:
        if is_peer_failure(err):  # before UserError: a save that failed because a peer died is a lost peer
            return _report_peer_loss(err)
        if isinstance(err, UserError):
            return _report(err)
        raise
    except KeyboardInterrupt:
        print("trainrun: interrupted (Ctrl-C): stopped without saving; checkpoints committed before are intact, "
              "run the same command again to resume from the newest", file=sys.stderr)
        return ExitCode.INTERRUPTED
    if result.is_rank0:
        _print_summary(result)
    return int(result.exit_code)


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (torchrun's RANK, Slurm's SLURM_PROCID)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def run_in_dir(cfg: DictConfig, run_dir: Path, write_record: Callable[[], None] = lambda: None) -> int:
    """Run one job in ``run_dir``.

    Rank 0 first locks every directory the run writes (the run directory and each checkpoint
    directory, see :func:`trainrun.launch.run_status.writer_dirs`), then writes the record of what
    runs (``write_record``: ``.hydra/``) and each attempt's outcome: a run refused because another
    one holds a directory has written nothing at all.
    """
    from trainrun.config import to_dataclass
    from trainrun.launch.run_status import RunDirLock, record_status, writer_dirs

    try:
        typed = to_dataclass(cfg)
        if _launch_rank() != 0:
            return _run_task(typed, run_dir)
        with RunDirLock(writer_dirs(typed, run_dir)):
            write_record()
            code, started = ExitCode.FAILED, time.time()

            def record(final: ExitCode) -> None:
                record_status(run_dir, final.name.lower(), int(final), started)

            with _last_words(record):  # also when the hang watchdog ends the process
                try:
                    code = _run_task(typed, run_dir)
                finally:
                    record(ExitCode(code))
    except UserError as err:  # e.g. a directory locked by another run
        return _report(err)
    return code


def _hydra_record_writer(cfg: DictConfig, run_dir: Path) -> Callable[[], None]:
    """What Hydra's ``run_job`` writes to ``<run dir>/.hydra`` before the task, for us to write after the lock.

    conf/hydra/default.yaml sets ``hydra.output_subdir: null`` so that Hydra itself writes nothing
    into a run directory another live run may hold; a user who sets it gets Hydra's own behaviour.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        return lambda: None

    def write() -> None:
        record = run_dir / ".hydra"
        record.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, record / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)}), record / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")

    return write


@contextlib.contextmanager
def _last_words(hook: Callable[[ExitCode], object]) -> Iterator[None]:
    """While the block runs, ``hook`` also runs if the hang watchdog ends the process (``os._exit``, no
    ``finally``): see :data:`trainrun.distributed.health.LAST_WORDS`."""
    from trainrun.distributed.health import LAST_WORDS

    LAST_WORDS.append(hook)
    try:
        yield
    finally:
        LAST_WORDS.remove(hook)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> int:
    """Run the composed config. A single run exits with its code; in a sweep (-m) each job returns
    its code to the launcher so one failing job does not end the others, a point that finished in
    an earlier launch of the same sweep is skipped, and a submitit job that asks to be resumed
    (code 3 after saving, 5 after a lost peer, 6 after a hang) is requeued instead of reported."""
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
    with _last_words(_requeue_on_hang) if in_submitit_job() else contextlib.nullcontext():
        code = run_in_dir(cfg, run_dir, _hydra_record_writer(cfg, run_dir))
    if code == ExitCode.INTERRUPTED:
        _exit_rank_now(code)  # a second Ctrl-C: now, without waiting for a save thread or the rest of a sweep
    if code == ExitCode.RESUME and multirun and _exit_signal_seen("ctrl_c_seen"):
        # Ctrl-C stops the sweep after this point's exit save, not just the point: launching the
        # same sweep again skips the finished points and resumes this one.
        raise KeyboardInterrupt
    if ExitCode(code).asks_to_be_requeued and in_submitit_job():
        # Returning would write submitit's result file and end the job for good; leaving without
        # one after `scontrol requeue` is what submitit's own preemption handler does. After a lost
        # peer rank 0 may be the one gone, so every surviving rank asks. After SIGTERM Slurm decides:
        # it requeues a preempted or requeued job itself, and a cancelled one must stay cancelled.
        if code == ExitCode.RESUME and _exit_signal_seen("sigterm_seen"):
            print("trainrun: stopped by SIGTERM after saving: Slurm requeues a preempted or requeued job itself; "
                  "a cancelled job stays cancelled (launch the same command again to resume it)", file=sys.stderr)
        else:
            requeue_this_job(any_rank=code != ExitCode.RESUME)
        raise SystemExit(code)
    if not multirun and launcher_world_size() > 1 and not in_submitit_job():
        _exit_rank_now(code)
    if not multirun and code != ExitCode.FINISHED:
        sys.exit(code)
    return code


def _requeue_on_hang(code: ExitCode) -> None:
    """The watchdog's last words in a submitit job: requeue it (any surviving rank asks)."""
    from trainrun.launch.slurm_requeue import requeue_this_job

    requeue_this_job(any_rank=True)


def _exit_signal_seen(flag: str) -> bool:
    """A run's exit controller in this process saw that signal (``ctrl_c_seen``: Ctrl-C, ``sigterm_seen``)."""
    if "trainrun.checkpoint.exit_controller" not in sys.modules:  # no run started: nothing could see it
        return False
    return getattr(sys.modules["trainrun.checkpoint.exit_controller"].ExitController, flag)


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
    """One line for a configuration error raised before the run: the field, what is wrong, the fix.

    Hydra's own report spans several lines, lists the internal ``base_*`` schema entries and, for a
    misspelled key, suggests adding the typo with ``+``; a key no schema defines gets the closest
    valid name instead, and a missing group option the closest option.
    """
    import re

    from trainrun.config.suggest import missing_option_message, unknown_key_message

    if isinstance(err, UserError):
        return " ".join(str(err).splitlines())
    for cause in _causes(err):
        key = getattr(cause, "full_key", None)
        if isinstance(cause, OmegaConfBaseException) and key:
            return f"{key}: {unknown_key_message(key) or str(cause).splitlines()[0]}"
        if isinstance(cause, MissingConfigException):
            options = [o for o in (cause.options or []) if not o.startswith("base_")]
            group, _, option = (cause.missing_cfg_file or "").rpartition("/")
            if group and cause.options is not None:
                return f"{group}={option}: {missing_option_message(group, option, options)}"
            first = str(cause).strip().splitlines()[0]
            return f"{first}; available: {', '.join(options)}" if options else first
    sweep = re.match(r"Ambiguous value for argument '([^=']+)=(.*)'$", str(err).strip().splitlines()[0])
    if sweep:  # a sweep (a,b or range(...)) without -m
        key, value = sweep.groups()
        return (f"{key}={value}: a sweep needs -m (--multirun); add -m to sweep over it, or write a list as "
                f"{key}=[{value}] or a string as '{key}=\"{value}\"'")
    return " ".join(str(err).split())


def main() -> None:
    """Console entry point."""
    import traceback

    from trainrun.config.convert import optional_group_options
    from trainrun.config.store import check_command_line

    register_configs()
    register_help_resolver()
    # conf/hydra/launcher/submitit_*.yaml keep the names users know and are typed by the plugin's
    # schemas of the same name; Hydra validates them that way and warns that it is deprecated.
    warnings.filterwarnings("ignore", message=r"(?s).*hydra/launcher/submitit_\w+' is validated against ConfigStore")
    # Unless HYDRA_FULL_ERROR is exactly "1", Hydra prints composition errors over several lines itself
    # and exits 1; set, they reach us, and every configuration error gets the same one line and exit
    # code 2, whatever the user's environment says (a crash in the run keeps its whole traceback).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        sys.argv[1:] = normalize_overrides(sys.argv[1:])
        check_command_line(sys.argv[1:], optional_group_options())  # before Hydra creates any directory
        hydra_entry()
    except UserError as err:
        if _task_started:
            raise  # a crash inside the run: the traceback matters, exit code 1
        sys.exit(_report(err))  # e.g. a sweep's pre-flight found a bad point
    except (HydraException, OmegaConfBaseException) as err:
        if _task_started:
            raise
        print(f"trainrun: configuration error: {composition_error_line(err)}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG_ERROR)
    except OSError as err:
        if _task_started or err.filename is None:
            raise
        # Before our task runs, Hydra only creates the run directory or, in a sweep, the sweep directory
        # and the points' directories under it. A sweep is told by Hydra's own multirun in the traceback,
        # however it was asked for (-m, --multirun, hydra.mode=MULTIRUN, a config that sets it).
        multirun = any(frame.f_code.co_name == "multirun" and frame.f_globals.get("__name__", "").startswith("hydra.")
                       for frame, _ in traceback.walk_tb(err.__traceback__))
        option = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        print(f"trainrun: environment error: {unwritable_dir_error(option, err.filename, err)}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG_ERROR)
    except KeyboardInterrupt:
        # A sweep's point saw Ctrl-C and saved (hydra_entry raised to end the sweep), or Ctrl-C came
        # between points or before any run started: nothing committed is lost either way.
        if _exit_signal_seen("ctrl_c_seen"):
            print("trainrun: sweep stopped by Ctrl-C after the point that saved; launch the same sweep again to "
                  "resume it (finished points are skipped)", file=sys.stderr)
            sys.exit(ExitCode.RESUME)
        print("trainrun: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    main()
