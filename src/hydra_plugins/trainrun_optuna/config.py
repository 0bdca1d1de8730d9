"""The sweeper's config schema, stored as ``hydra/sweeper/trainrun_optuna``."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class TrainrunOptunaSweeperConf:
    """An Optuna study whose trials are sweep points launched by the configured Hydra launcher."""

    _target_: str = "hydra_plugins.trainrun_optuna.sweeper.TrainrunOptunaSweeper"
    direction: str = "minimize"
    """minimize or maximize the objective."""
    objective: str = "val_loss"
    """Metric to optimise: its value in the last row of the trial's metrics.jsonl that has it."""
    n_trials: int = 20
    """Trials in the study in all, counting those of earlier launches (the study resumes); a trial queued
    again to resume a stopped or interrupted one counts once for both."""
    n_jobs: int = 1
    """Trials launched at once (one launcher batch)."""
    sampler: str = "tpe"
    """tpe or random."""
    seed: int | None = None
    """Sampler seed (a seeded study proposes the same trials again)."""
    study_name: str = "trainrun"
    """Name of the study in its storage."""
    storage: str | None = None
    """Optuna storage URL; null: sqlite in the sweep directory (optuna.db), so the study can be resumed."""
    params: dict[str, str] = field(default_factory=dict)
    """Search space in Hydra's override grammar: interval(a,b), tag(log, interval(a,b)), tag(int, interval(a,b)),
    choice(x,y,...), range(a,b[,step])."""


def register() -> None:
    """Store the schema as an option of the hydra/sweeper group (idempotent)."""
    ConfigStore.instance().store(group="hydra/sweeper", name="trainrun_optuna", node=TrainrunOptunaSweeperConf,
                                 provider="trainrun")
