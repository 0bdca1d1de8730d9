"""``python -m trainrun``: Hydra composes the config; the orchestrator runs it.

Exit codes are those of :mod:`trainrun.exit_codes`; configuration errors (including Hydra's
own composition errors) exit 2 with a short message and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from trainrun.checkpoint.store import CheckpointError
from trainrun.config import ConfigError, register_configs
from trainrun.config.convert import config_dir
from trainrun.exit_codes import ExitCode
from trainrun.registry import UnknownComponentError

_task_started = False


def _print_summary(result) -> None:
    if result.sample is not None:
        print("\n--- sample ---\n" + result.sample + "\n--------------")
    if result.final_eval:
        print("final " + " ".join(f"{k}={v:.4f}" for k, v in result.final_eval.items()))
    print(f"run directory: {result.run_dir.resolve()}")


def _run_task(cfg: DictConfig) -> int:
    """Run one job; return its exit code (errors a user can fix become one line on stderr)."""
    from trainrun import orchestrator

    try:
        result = orchestrator.run(cfg, run_dir=Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, UnknownComponentError) as err:
        print(f"trainrun: configuration error: {err}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except CheckpointError as err:
        print(f"trainrun: checkpoint error: {err}", file=sys.stderr)
        return ExitCode.FAILED
    if result.is_rank0:
        _print_summary(result)
    return int(result.exit_code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def hydra_entry(cfg: DictConfig) -> int:
    """Run the composed config. A single run exits with its code; in a sweep (-m) each job returns
    its code to the launcher so one failing job does not end the others."""
    global _task_started
    _task_started = True
    code = _run_task(cfg)
    if HydraConfig.get().mode != RunMode.MULTIRUN and code != ExitCode.FINISHED:
        sys.exit(code)
    return code


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
