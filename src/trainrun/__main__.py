"""``python -m trainrun``: Hydra composes the config; the orchestrator runs it.

Exit codes are those of :mod:`trainrun.exit_codes`; configuration errors (including Hydra's
own composition errors) exit 2 with a short message and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainrun.checkpoint.store import CheckpointError
from trainrun.config import ConfigError, register_configs
from trainrun.config.convert import config_dir
from trainrun.exit_codes import ExitCode
from trainrun.registry import UnknownComponentError

_task_started = False


def _fail_config(message: str) -> None:
    print(f"trainrun: configuration error: {message}", file=sys.stderr)
    sys.exit(ExitCode.CONFIG_ERROR)


def _print_summary(result) -> None:
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    if result.final_eval:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in result.final_eval.items()))
    print(f"run directory: {result.run_dir.resolve()}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> None:
    """Convert the composed config and run it; translate the outcome into an exit code."""
    global _task_started
    _task_started = True
    from trainrun import orchestrator

    try:
        result = orchestrator.run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, UnknownComponentError) as err:
        _fail_config(str(err))
    except CheckpointError as err:
        print(f"trainrun: checkpoint error: {err}", file=sys.stderr)
        sys.exit(ExitCode.FAILED)
    _print_summary(result)
    if result.exit_code != ExitCode.FINISHED:
        sys.exit(int(result.exit_code))


def main() -> None:
    """Console entry point."""
    register_configs()
    try:
        hydra_entry()
    except SystemExit as exit_:
        # Hydra reports composition errors (unknown key, bad type, missing group option) and exits 1
        # before our task starts; those are configuration errors too.
        if exit_.code == 1 and not _task_started:
            sys.exit(ExitCode.CONFIG_ERROR)
        raise


if __name__ == "__main__":
    main()
