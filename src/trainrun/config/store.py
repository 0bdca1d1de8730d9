"""Registers the dataclass schemas in Hydra's ConfigStore (called explicitly, not on import)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore

from trainrun.config import schema

GROUP_SCHEMAS: dict[str, type] = {
    "run": schema.RunConfig,
    "model": schema.ModelConfig,
    "optim": schema.OptimConfig,
    "data": schema.DataConfig,
    "train": schema.TrainConfig,
    "eval": schema.EvalConfig,
    "parallel": schema.ParallelConfig,
    "checkpoint": schema.CheckpointConfig,
    "logging": schema.LoggingConfig,
    "paths": schema.PathsConfig,
    "debug": schema.DebugConfig,
}
"""Section name -> its schema, in the order of ``TrainRunConfig``."""

SCHEMA_BACKED_GROUPS = ("model", "optim", "data", "train", "parallel", "checkpoint", "logging", "paths")
"""Config groups whose YAML files extend ``/base_<group>@_here_``. run and eval have no files (schema
defaults and overrides suffice); debug's presets are ``_global_`` and set fields of several sections."""

SLOT_GROUPS = ("experiment", "hparams_search", "debug")
"""Groups filled from the command line into a null slot of the defaults list; ``+group=x`` means ``group=x``."""


def register_configs() -> None:
    """Store ``base_config`` and the ``base_<group>`` schemas, as Hydra's structured-config tutorial 5.2 does.

    The group schemas sit at the root of the ConfigStore, not inside their groups, and group files
    extend them with ``/base_<group>@_here_``: inside a group they would be options a user can pick,
    and Hydra's --help and shell completion would offer ``model=base_model``.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema.TrainRunConfig)
    for group in SCHEMA_BACKED_GROUPS:
        cs.store(name=f"base_{group}", node=GROUP_SCHEMAS[group])
    expose_hydra_plugins()


def expose_hydra_plugins() -> None:
    """Make trainrun's Hydra plugins (hydra_plugins/trainrun_optuna) visible to Hydra's plugin scan.

    Hydra walks ``hydra_plugins.__path__``, which lists the ``hydra_plugins`` folders on sys.path. A
    wheel puts trainrun's there; an editable install maps it through an import hook instead, which
    the walk does not see, so its folder is added to the namespace path (once).
    """
    import importlib.util

    import hydra_plugins

    spec = importlib.util.find_spec("hydra_plugins.trainrun_optuna")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = str(Path(list(spec.submodule_search_locations)[0]).parent)
    if folder not in list(hydra_plugins.__path__):
        hydra_plugins.__path__.append(folder)


_FLOAT_WORDS = {"nan", "inf", "+inf", "-inf"}


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Command-line spellings of the slot groups that Hydra alone would refuse.

    * ``+experiment=x`` (the spelling trainrun documents) means ``experiment=x``: the slots exist in
      the defaults list with a null value, so ``+`` would fail with "Multiple values for experiment";
    * ``debug=nan`` picks the preset named nan: Hydra's grammar reads a bare ``nan`` (or ``inf``) as
      a float, which is no option name, so such a value is quoted.
    """
    normalized = []
    for override in overrides:
        key, sep, value = override.partition("=")
        group = key.removeprefix("+")
        if sep and group in SLOT_GROUPS:
            if value.lower() in _FLOAT_WORDS:
                value = f"'{value}'"
            override = f"{group}={value}"
        normalized.append(override)
    return normalized
