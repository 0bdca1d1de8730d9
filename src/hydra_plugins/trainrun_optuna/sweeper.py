"""Optuna trials as Hydra sweep points: ask, launch through the configured launcher, tell.

A trial that fails (non-zero exit code, an exception, or a non-finite objective) is told FAILED and
the study goes on. The study lives in ``<sweep dir>/optuna.db`` by default, so launching the same
command again with the same ``hydra.sweep.dir`` continues it up to ``n_trials``. The best trial is
logged and written to ``<sweep dir>/optuna_best.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


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


def trial_objective(job_return: Any, objective: str) -> float | None:
    """The objective of a finished trial (its last evaluation's ``objective``), or None if it failed."""
    try:
        code = job_return.return_value
    except Exception:  # noqa: BLE001 - a crashed trial is a failed trial, whatever it raised
        return None
    if code != 0:
        return None
    run_dir = Path(str(job_return.hydra_cfg.hydra.runtime.output_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [row[objective] for row in rows if objective in row]
    return float(values[-1]) if values and math.isfinite(values[-1]) else None


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

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """Keep the config and build the launcher the trials go through."""
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def _study(self, sweep_dir: Path) -> Any:
        import optuna

        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        if self.sampler_name not in samplers:
            raise ValueError(f"hydra.sweeper.sampler={self.sampler_name!r}: use one of {', '.join(samplers)}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        return optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction,
                                   sampler=samplers[self.sampler_name](seed=self.seed), load_if_exists=True)

    def sweep(self, arguments: list[str]) -> Any:
        """Run trials until the study holds ``n_trials`` finished or failed ones; return the best value."""
        import optuna

        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        parser = OverridesParser.create()
        parsed = parser.parse_overrides([*(f"{k}={v}" for k, v in self.params.items()), *arguments])
        space = [o for o in parsed if o.is_sweep_override()]
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        study = self._study(sweep_dir)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        done = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
        while (remaining := self.n_trials - sum(t.state in done for t in study.trials)) > 0:
            trials = [study.ask() for _ in range(min(self.n_jobs, remaining))]
            batch = [[*fixed, *(f"{o.get_key_element()}={suggest(t, o)}" for o in space)] for t in trials]
            returns: Sequence[Any] = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, overrides, job_return in zip(trials, batch, returns, strict=True):
                value = trial_objective(job_return, self.objective)
                if value is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, " ".join(overrides))
                else:
                    study.tell(trial, value)
                    log.info("trial %d: %s=%.5g with %s", trial.number, self.objective, value, " ".join(overrides))
        return self._report_best(study, sweep_dir)

    def _report_best(self, study: Any, sweep_dir: Path) -> Any:
        import optuna

        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            log.error("no trial of study %s finished", self.study_name)
            return None
        best = study.best_trial
        summary = {"objective": self.objective, "best_value": best.value, "best_params": best.params,
                   "trial": best.number, "trials": len(study.trials),
                   "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)}
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optuna_best.yaml")
        log.info("best trial %d: %s=%.5g with %s", best.number, self.objective, best.value, best.params)
        print(f"trainrun: best trial {best.number}: {self.objective}={best.value:.5g} "
              f"{' '.join(f'{k}={v}' for k, v in best.params.items())}")
        return best.value
