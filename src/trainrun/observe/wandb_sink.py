"""Weights & Biases sink; offline mode writes everything under the run directory."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from trainrun.config.schema import LoggingConfig, WandbConfig
from trainrun.errors import RunEnvironmentError, first_line
from trainrun.extras import require
from trainrun.observe.sinks import Metrics
from trainrun.registry import METRIC_SINKS

WANDB_ID_FILE = "wandb_id.txt"
WANDB_OFFLINE_FIX = "or use logging.wandb.mode=offline (upload later with `wandb sync`)"
"""The way out every wandb environment error offers (the start-up check and the sink's own)."""


def stable_run_id(run_dir: Path) -> str:
    """The wandb run id of this run directory, created on first use.

    Persisting it in ``<run_dir>/wandb_id.txt`` makes a resumed run continue the same wandb run
    instead of starting a new one.
    """
    path = run_dir / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # 8 chars of [0-9a-f], valid for wandb ids
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def sweep_group(run_dir: Path) -> str | None:
    """The sweep directory's name when ``run_dir`` is a sweep point (Hydra writes multirun.yaml there)."""
    return run_dir.parent.name if (run_dir.parent / "multirun.yaml").is_file() else None


class WandbSink:
    """Logs metric rows to a wandb run (``resume="allow"`` on a stable id)."""

    def __init__(self, cfg: WandbConfig, run_dir: Path):
        require("wandb", "wandb", "logging.wandb.enabled=true (logging=wandb)")
        import wandb  # imported here: an extra, slow to import and only needed when enabled

        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = stable_run_id(run_dir)
        try:
            self._run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                group=cfg.group or sweep_group(run_dir),
                dir=str(run_dir),
                mode=cfg.mode.value,
                id=self.run_id,
                resume="allow",
                # silent: no banner or sync hints in the training log; console="off": wandb must not
                # wrap stdout/stderr, which would fight with the tqdm bar and our own train.log.
                settings=wandb.Settings(silent=True, console="off"),
            )
        except wandb.errors.Error as err:
            # No server, a rejected key, no credentials: the user's environment, not a crash of ours.
            raise RunEnvironmentError(
                f"wandb.init failed (logging.wandb.mode={cfg.mode.value})", first_line(err),
                f"check the network and WANDB_API_KEY / `wandb login`, {WANDB_OFFLINE_FIX}") from None

    @property
    def run(self) -> Any:
        """The underlying ``wandb.Run``."""
        return self._run

    def log(self, metrics: Metrics, step: int) -> None:
        """Log one row at ``step`` (wandb drops steps lower than ones it has already seen)."""
        self._run.log(dict(metrics), step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        """Store the resolved config as the wandb run config."""
        self._run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        """Finish the run, flushing offline files."""
        if self._run is not None:
            self._run.finish()
            self._run = None


@METRIC_SINKS.register("wandb", switch="logging.wandb.enabled")
def build_wandb_sink(cfg: LoggingConfig, run_dir: Path) -> WandbSink:
    """Registry factory for :class:`WandbSink` from ``logging.wandb``."""
    return WandbSink(cfg.wandb, run_dir)
