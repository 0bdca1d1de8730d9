"""Optional dependencies: which feature needs which extra, and the one line a missing one gets.

A plain ``pip install trainrun`` brings what training needs (torch, hydra-core, omegaconf, numpy,
tokenizers, tqdm). Every other library belongs to the extra of the feature that uses it:

=================  ===============================  ==================================================
extra              packages                         features
=================  ===============================  ==================================================
``wandb``          wandb                            ``logging=wandb`` (``logging.wandb.enabled``)
``tensorboard``    tensorboard                      ``logging=tensorboard`` (``logging.tensorboard``)
``report``         matplotlib                       trainrun-report's PNG, ``observe.analysis.plot_run``
``optuna``         optuna                           ``hparams_search=...`` (``hydra/sweeper=trainrun_optuna``)
``hf``             transformers, safetensors        ``model.init_from``, trainrun-export
``slurm``          hydra-submitit-launcher          ``hydra/launcher=submitit_slurm``, ``submitit_local``
``prepare``        zstandard, pyarrow, datasets     trainrun-prepare's .jsonl.zst, .parquet, save_to_disk inputs
``all``            all of the above
=================  ===============================  ==================================================

Choosing a feature whose extra is missing raises :class:`MissingExtraError` (exit code 2, one line
naming the feature and the ``pip install``) before anything expensive starts: the run's start-up
checks (:func:`check_run_extras`, from :func:`trainrun.preflight.check_environment`), a sweep's
pre-flight (:func:`check_sweep_extras`), and each command's first step. Every import of an optional
library sits inside the function that needs it, behind :func:`require`, never at module level.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from trainrun.errors import RunEnvironmentError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from trainrun.config.schema import TrainRunConfig


class MissingExtraError(RunEnvironmentError):
    """A chosen feature needs a package this Python environment lacks; the fix is the extra's ``pip install``."""

    def __init__(self, feature: str, module: str, extra: str):
        package = module.split(".")[-1 if module.startswith("hydra_plugins.") else 0].replace("_", "-")
        super().__init__(f"{feature} needs {package}", sys.prefix, f"pip install 'trainrun[{extra}]'")
        self.feature, self.module, self.extra = feature, module, extra
        # one line that reads in order: the feature, the package, where it is missing, the fix
        self.args = (f"{feature} needs {package}, which is not installed in this Python ({sys.prefix}): "
                     f"pip install 'trainrun[{extra}]'",)


def installed(module: str) -> bool:
    """``module`` can be imported (found on the path; not imported, so this is cheap)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a module without a spec
        return False


def require(module: str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` for ``feature`` unless ``module`` (of the extra ``extra``) is installed."""
    if not installed(module):
        raise MissingExtraError(feature, module, extra)


def check_run_extras(cfg: TrainRunConfig) -> None:
    """The extras of the features a (non-dry) run's config chooses."""
    if cfg.logging.wandb.enabled:
        require("wandb", "wandb", "logging.wandb.enabled=true (logging=wandb)")
    if cfg.logging.tensorboard:
        require("tensorboard", "tensorboard", "logging.tensorboard=true (logging=tensorboard)")
    if cfg.model.init_from:
        require("safetensors", "hf", "model.init_from")


def check_sweep_extras(config: DictConfig) -> None:
    """The extras of a sweep's sweeper and launcher (``config``: the composed config, ``hydra`` node included)."""
    choices = config.hydra.runtime.get("choices") or {}
    launcher, sweeper = str(choices.get("hydra/launcher", "")), str(choices.get("hydra/sweeper", ""))
    if launcher.startswith("submitit") or "submitit" in str(config.hydra.launcher.get("_target_", "")):
        require("hydra_plugins.hydra_submitit_launcher", "slurm", f"hydra/launcher={launcher or 'submitit'}")
    if sweeper == "trainrun_optuna" or "trainrun_optuna" in str(config.hydra.sweeper.get("_target_", "")):
        search = choices.get("hparams_search")
        require("optuna", "optuna", f"hparams_search={search}" if search else "hydra/sweeper=trainrun_optuna")
