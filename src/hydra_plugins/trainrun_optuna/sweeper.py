"""Optuna trials as Hydra sweep points: pre-flight, ask, launch through the configured launcher, tell.

Before the study is touched, the sweeper's options and search space are checked and a probe point
(the fixed overrides, each parameter at its first value) goes through the sweep pre-flight of
:mod:`trainrun.launch.sweep_callback` plus the search's own rule that the objective can be read
(metrics.jsonl is written and the run trains): a config every trial would share is refused with
one line and exit code 2. Each trial then gets the same pre-flight before it is launched: a trial
whose config is refused is told FAIL without running and the search goes on (the sampler learns
to avoid it); an environment refusal (an unwritable directory) stops the search with exit code 2.

Every trial asked is told, never left RUNNING: COMPLETE with its objective (the last value of
``objective`` in its metrics.jsonl), or FAIL (a non-zero exit code, a crash, no metrics.jsonl, a
non-finite objective, refused, interrupted). A trial that stopped early to be resumed (exit code
3) is told FAIL and its parameters are queued again, so the next launch resumes its run directory
from its checkpoint; the search then stops and exits 3. So are the trials of an interrupted launch,
and trials left RUNNING by a sweeper that died on this host (settled when the study is opened
again: told their objective if their point finished). A trial that finished but never logged the
objective means ``hydra.sweeper.objective`` names no metric: the search stops with exit code 2.

The study lives in ``<sweep dir>/optuna.db`` by default, so launching the same command again with
the same ``hydra.sweep.dir`` continues it up to ``n_trials``. Each trial gets the sweep summary line
of its point; the best trial is printed and written to ``<sweep dir>/optuna_best.yaml``. The exit
code is 0 when the study holds a finished trial, else that of its trials (1 if any crashed, else
the first other code): a search whose trials all failed never exits 0.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from trainrun.config.blend import parse_blend, parse_split
from trainrun.config.schema import TrainRunConfig
from trainrun.errors import ConfigError, DataError, RunEnvironmentError, UserError
from trainrun.exit_codes import ExitCode
from trainrun.extras import require
from trainrun.launch.run_status import read_status
from trainrun.launch.sweep_callback import (
    check_point,
    exit_code_of,
    point_summary,
    preflight,
    refuse,
    sweep_exit_code,
    world_size_per_job,
)

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
DIRECTIONS = ("minimize", "maximize")
RESUMES = "resumes_trial"
"""User attribute of a queued trial: the number of the trial whose run it resumes (that one no longer counts)."""


def suggest(trial: Any, override: Override) -> str:
    """Ask ``trial`` for a value of one search-space override; return it as an override value string."""
    name, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        if "int" in value.tags:
            return str(trial.suggest_int(name, int(value.start), int(value.end), log="log" in value.tags))
        return repr(trial.suggest_float(name, float(value.start), float(value.end), log="log" in value.tags))
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return str(trial.suggest_categorical(name, list(override.sweep_string_iterator())))
    raise ValueError(f"{name}: use interval(...), choice(...) or range(...) in hydra.sweeper.params, not {value!r}")


def check_space(space: Sequence[Override]) -> None:
    """Every search-space override is one :func:`suggest` can ask for (checked before any trial is asked)."""
    for override in space:
        if not isinstance(override.value(), (IntervalSweep, ChoiceSweep, RangeSweep)):
            raise ConfigError(f"hydra.sweeper.params.{override.get_key_element()}", override.input_line,
                              "use interval(a,b), tag(log, interval(a,b)), tag(int, interval(a,b)), choice(x,y,...) "
                              "or range(a,b[,step])")


def probe_overrides(space: Sequence[Override]) -> list[str]:
    """Each search-space parameter at its first value: a point every search could propose."""
    probe = []
    for override in space:
        value = override.value()
        if isinstance(value, IntervalSweep):
            first = str(int(value.start)) if "int" in value.tags else repr(float(value.start))
        else:
            first = next(iter(override.sweep_string_iterator()))
        probe.append(f"{override.get_key_element()}={first}")
    return probe


def check_objective_readable(cfg: TrainRunConfig, objective: str = "val_loss") -> None:
    """A trial of this config writes the metrics.jsonl its objective is read from, and logs the objective: a
    ``test_loss`` needs test sources, a ``val_loss/<source>`` (or ``test_loss/<source>``) one of the blend's."""
    if objective.startswith("test_loss") and not _has_test_data(cfg):
        raise ConfigError("hydra.sweeper.objective", objective,
                          "no trial evaluates a test set: give it one (data.split with a test share, e.g. "
                          "'data.split=\"969,30,1\"', or data.test_blend) with eval.test=true, or use val_loss")
    source = objective.partition("/")[2]
    if source and objective.partition("/")[0] in ("val_loss", "test_loss"):
        names = _eval_source_names(cfg, objective.partition("/")[0])
        if source not in names:
            raise ConfigError("hydra.sweeper.objective", objective,
                              f"no evaluated source is named {source!r}; per-source losses exist for a blend of "
                              f"several sources ({', '.join(names) if names else 'this run has one'})")
    if not cfg.logging.jsonl:
        raise ConfigError("logging.jsonl", cfg.logging.jsonl,
                          "an Optuna search reads each trial's objective from metrics.jsonl; set logging.jsonl=true")
    if cfg.run.dry_run:
        raise ConfigError("run.dry_run", cfg.run.dry_run,
                          "a dry run trains nothing, so no trial has an objective; set run.dry_run=false")


def _has_test_data(cfg: TrainRunConfig) -> bool:
    """The run ends with a test evaluation (eval.test and a test share of data.split or a data.test_blend)."""
    data = getattr(cfg, "data", None)
    if data is None or not getattr(getattr(cfg, "eval", None), "test", True):
        return False
    split = parse_split(data.split)
    return data.test_blend is not None or (split is not None and split[2] > 0)


def _eval_source_names(cfg: TrainRunConfig, kind: str) -> list[str]:
    """The sources a run logs ``<kind>/<name>`` for (none for a single source, whose loss is ``<kind>`` alone)."""
    data = cfg.data
    explicit = parse_blend(data.valid_blend if kind == "val_loss" else data.test_blend, f"data.{kind}")
    sources = explicit or parse_blend(data.blend, "data.blend") or ()
    names = [s.name for s in sources if s.weight > 0]
    return names if len(names) > 1 else []


def job_exit_code(job_return: JobReturn) -> ExitCode:
    """The exit code a job handed to the launcher; 1 for a job that raised (read without re-raising it)."""
    if job_return.status != JobStatus.COMPLETED:
        return ExitCode.FAILED
    try:
        return ExitCode(int(job_return._return_value))
    except (TypeError, ValueError):
        return ExitCode.FAILED


class TrialResult(NamedTuple):
    """What one launched trial is told: its objective (None: FAIL), its exit code, why it failed.

    (Not a dataclass: Hydra's plugin scan executes this module outside ``sys.modules``.)"""

    value: float | None
    code: ExitCode
    reason: str = ""
    objective_missing: bool = False


def trial_result(code: ExitCode, run_dir: Path, objective: str) -> TrialResult:
    """Read the objective of a trial that exited with ``code`` from its metrics (the one metrics reader)."""
    from trainrun.observe.analysis import has_key, last_value, load_metrics  # trainrun.observe brings torch

    if code != ExitCode.FINISHED:
        return TrialResult(None, code)  # the point's summary line says why
    metrics = load_metrics(run_dir)
    if not metrics.found:
        return TrialResult(None, ExitCode.FAILED, f"no metrics.jsonl in {run_dir}")
    if not has_key(metrics, objective):
        return TrialResult(None, ExitCode.CONFIG_ERROR, f"its metrics.jsonl has no {objective!r}",
                           objective_missing=True)
    value = last_value(metrics, objective)
    if value is None:
        return TrialResult(None, ExitCode.BAD_STEPS, f"{objective} is not finite")
    return TrialResult(value, ExitCode.FINISHED)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(owner: str | None) -> bool:
    """The sweeper that asked a trial is no longer running (known only for one of this host)."""
    if not owner:
        return True  # asked by a sweeper that did not record itself: an older trainrun
    host, _, pid_text = owner.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # a dead sweeper's pid, reused by us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


class TrainrunOptunaSweeper(Sweeper):
    """See the module docstring; options are those of ``TrainrunOptunaSweeperConf``."""

    def __init__(self, direction: str, objective: str, n_trials: int, n_jobs: int, sampler: str,
                 seed: int | None, study_name: str, storage: str | None, params: dict[str, str] | None):
        self.direction, self.objective = direction, objective
        self.n_trials, self.n_jobs = n_trials, max(1, n_jobs)
        self.sampler_name, self.seed = sampler, seed
        self.study_name, self.storage = study_name, storage
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.codes: list[ExitCode] = []
        """Exit codes of the trials this launch told (a refused trial: 2)."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the config and build the launcher the trials go through."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _check_options(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError("hydra.sweeper.direction", self.direction, f"use one of {', '.join(DIRECTIONS)}")
        if self.sampler_name not in SAMPLERS:
            raise ConfigError("hydra.sweeper.sampler", self.sampler_name, f"use one of {', '.join(SAMPLERS)}")
        if self.n_trials < 1:
            raise ConfigError("hydra.sweeper.n_trials", self.n_trials, "must be at least 1")

    def _study(self, sweep_dir: Path) -> Any:
        require("optuna", "optuna", "hydra/sweeper=trainrun_optuna")  # the extra; the sweep callback checked it first
        import optuna

        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        try:
            return optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                       sampler=samplers[self.sampler_name](seed=self.seed), load_if_exists=True)
        except Exception as err:  # noqa: BLE001 - optuna and SQLAlchemy raise many kinds; all are a bad storage
            raise ConfigError("hydra.sweeper.storage", storage,
                              f"the study {self.study_name!r} cannot be opened there "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                              "fix the URL or use another study_name") from None

    def sweep(self, arguments: list[str]) -> Any:
        """Run trials until the study holds ``n_trials`` told ones; return the best value (exit codes: module doc)."""
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        world_size = world_size_per_job(self.config)
        try:
            self._check_options()
            parsed = OverridesParser.create().parse_overrides(
                [*(f"{k}={v}" for k, v in self.params.items()), *arguments])
            space = [o for o in parsed if o.is_sweep_override()]
            fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
            check_space(space)
            _, probe = check_point(self.config, [*fixed, *probe_overrides(space)], world_size)
            check_objective_readable(probe, self.objective)
            study = self._study(sweep_dir)
        except UserError as err:
            refuse(err)
        print(f"trainrun: pre-flight: the search's config composes and validates for {world_size} process(es) "
              "per job; each trial is checked before it is launched", file=sys.stderr)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._settle_stale(study, sweep_dir)
        stop: Exception | ExitCode | None = None
        while stop is None and (remaining := self.n_trials - self._counted(study)) > 0:
            stop = self._run_batch(study, space, fixed, sweep_dir, world_size, min(self.n_jobs, remaining))
        return self._finish(study, sweep_dir, stop)

    def _counted(self, study: Any) -> int:
        """Told trials toward ``n_trials``, leaving out those whose run a queued trial resumes."""
        import optuna

        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        resumed = {t.user_attrs.get(RESUMES) for t in trials}
        return sum(t.state in done and t.number not in resumed for t in trials)

    def _fail(self, study: Any, trial: Any, requeue: bool) -> None:
        """Tell ``trial`` FAIL; ``requeue``: queue its parameters again so the next trial resumes its point."""
        import optuna

        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if requeue and trial.params:
            study.enqueue_trial(dict(trial.params), user_attrs={RESUMES: trial.number})

    def _run_batch(self, study: Any, space: list[Override], fixed: list[str], sweep_dir: Path, world_size: int,
                   size: int) -> Exception | ExitCode | None:
        """Ask ``size`` trials, pre-flight, launch and tell them all; return why the search must stop, if it must."""
        trials = [study.ask() for _ in range(size)]
        told: set[int] = set()
        try:
            for trial in trials:
                trial.set_user_attr("sweeper", _owner())
            batch = [[*fixed, *(f"{o.get_key_element()}={suggest(t, o)}" for o in space)] for t in trials]
            points: dict[int, str] = {}
            overrides_of = {t.number: o for t, o in zip(trials, batch, strict=True)}
            for trial, overrides in zip(trials, batch, strict=True):
                try:
                    [(point, cfg)] = preflight(self.config, [overrides], world_size, distinct=False)
                    check_objective_readable(cfg, self.objective)
                except (ConfigError, DataError) as err:
                    self._fail(study, trial, requeue=False)
                    told.add(trial.number)
                    self._record(ExitCode.CONFIG_ERROR,
                                 f"trial {trial.number} [{' '.join(overrides[len(fixed):])}]: refused: {err}")
                    continue
                except RunEnvironmentError as err:
                    return err  # the finally below tells every trial of the batch
                trial.set_user_attr("point", point)
                points[trial.number] = point
            # The same parameters twice in one batch are one point: launched once, both told its result.
            unique = {points[t.number]: o for t, o in zip(trials, batch, strict=True) if t.number in points}
            returns: Sequence[JobReturn] = self.launcher.launch(
                list(unique.values()), initial_job_idx=trials[0].number) if unique else []
            by_point = dict(zip(unique, returns, strict=True))
            stop: Exception | ExitCode | None = None
            for trial in trials:
                if trial.number in told:
                    continue
                job_return = by_point[points[trial.number]]
                run_dir = Path(str(job_return.hydra_cfg.hydra.runtime.output_dir)) if job_return.hydra_cfg else \
                    sweep_dir / points[trial.number]
                result = trial_result(job_exit_code(job_return), run_dir, self.objective)
                stop = self._tell(study, trial, result, run_dir, overrides_of[trial.number], fixed) or stop
                told.add(trial.number)
            return stop
        finally:
            for trial in trials:  # interrupted, or the sweeper itself failed: never leave a trial RUNNING
                if trial.number not in told:
                    try:
                        self._fail(study, trial, requeue=True)
                    except Exception as err:  # noqa: BLE001 - told just before the interruption; keep its cause
                        log.warning("trial %d: %s", trial.number, err)
                        continue
                    print(f"trainrun: trial {trial.number} was not launched or not seen to its end; told FAIL, "
                          "its parameters queued again for the next launch", file=sys.stderr)

    def _tell(self, study: Any, trial: Any, result: TrialResult, run_dir: Path, overrides: list[str],
              fixed: list[str]) -> Exception | ExitCode | None:
        """Tell one launched trial its result; record its summary line; return a reason to stop, if any."""
        trial.set_user_attr("exit_code", int(result.code))
        _, line = point_summary(run_dir, overrides, common=fixed)
        if result.value is not None:
            study.tell(trial, result.value)
            objective = "" if self.objective == "val_loss" else f"; {self.objective} {result.value:.5g}"
            self._record(result.code, f"trial {trial.number}, {line}{objective}")
            return None
        self._fail(study, trial, requeue=result.code == ExitCode.RESUME)
        self._record(result.code, f"trial {trial.number} failed, {line}{'; ' + result.reason if result.reason else ''}")
        if result.objective_missing:
            return ConfigError("hydra.sweeper.objective", self.objective,
                               f"trial {trial.number} finished but logged no {self.objective!r} in "
                               f"{run_dir}/metrics.jsonl; name a metric its rows have (e.g. val_loss, loss)")
        return ExitCode.RESUME if result.code == ExitCode.RESUME else None

    def _record(self, code: ExitCode, line: str) -> None:
        """Keep a trial's exit code for the search's own and print its summary line."""
        self.codes.append(code)
        print(f"trainrun: {line}", file=sys.stderr)

    def _settle_stale(self, study: Any, sweep_dir: Path) -> None:
        """Tell the RUNNING trials of a sweeper that died: their objective if their point finished, else FAIL
        (queued again, so their point is resumed)."""
        import optuna

        from trainrun.observe.analysis import last_value, load_metrics

        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if not _owner_gone(frozen.user_attrs.get("sweeper")):
                continue
            point = frozen.user_attrs.get("point")
            run_dir = sweep_dir / str(point)
            value = None
            if point and exit_code_of(read_status(run_dir)) == ExitCode.FINISHED:
                value = last_value(load_metrics(run_dir), self.objective)
            if value is not None:
                study.tell(frozen.number, value)
                told = f"its {self.objective} {value:.5g}"
            else:
                study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
                told = "FAIL"
                if frozen.params:
                    study.enqueue_trial(dict(frozen.params), user_attrs={RESUMES: frozen.number})
                    told += ", its parameters queued again"
            print(f"trainrun: trial {frozen.number} was left running by a sweeper that is gone; told {told}",
                  file=sys.stderr)

    def _finish(self, study: Any, sweep_dir: Path, stop: Exception | ExitCode | None) -> Any:
        best = self._report_best(study, sweep_dir)
        if isinstance(stop, Exception):
            refuse(stop)
        if stop is not None:
            print(f"trainrun: a trial stopped early to be resumed: launch the same command again to resume it "
                  f"(exit code {int(stop)})", file=sys.stderr)
            raise SystemExit(stop)
        if best is None:
            code = sweep_exit_code(self.codes)
            raise SystemExit(ExitCode.FAILED if code == ExitCode.FINISHED else code)
        return best

    def _report_best(self, study: Any, sweep_dir: Path) -> Any:
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
        if not complete:
            print(f"trainrun: no trial of study {self.study_name} finished ({failed} failed)", file=sys.stderr)
            return None
        best = study.best_trial
        summary = {"objective": self.objective, "best_value": best.value, "best_params": best.params,
                   "trial": best.number, "trials": self._counted(study), "failed": failed}
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optuna_best.yaml")
        log.info("best trial %d: %s=%.5g with %s", best.number, self.objective, best.value, best.params)
        print(f"trainrun: best trial {best.number}: {self.objective}={best.value:.5g} "
              f"{' '.join(f'{k}={v}' for k, v in best.params.items())}")
        return best.value
