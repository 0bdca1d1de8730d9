"""Turn Hydra's DictConfig into the typed ``TrainRunConfig`` and compose configs outside Hydra's main."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainrun.config.schema import TrainRunConfig

CONF_PACKAGE = "trainrun.conf"
"""The package that holds config.yaml: conf/ of the checkout, mapped by pyproject.toml's package-dir
(editable installs resolve it to the checkout's conf/, wheels to site-packages/trainrun/conf)."""


def config_dir() -> Path:
    """The directory holding config.yaml, found through the import system (editable or wheel install)."""
    # find_spec rather than a path relative to this file: in an editable install conf/ is not next to
    # src/trainrun, and setuptools' editable finder is the only thing that knows where it is.
    spec = importlib.util.find_spec(CONF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "config.yaml").is_file():
            return Path(location)
    raise FileNotFoundError(
        f"trainrun's configs are missing: no config.yaml in package {CONF_PACKAGE} (searched: "
        f"{', '.join(map(str, locations)) or 'package not found'}). Reinstall trainrun "
        "(pip install . or pip install -e . from a checkout that has conf/config.yaml).")


def to_dataclass(cfg: DictConfig | TrainRunConfig) -> TrainRunConfig:
    """Resolve interpolations and return a plain ``TrainRunConfig`` instance."""
    if isinstance(cfg, TrainRunConfig):
        return cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def compose_config(overrides: list[str] | None = None) -> TrainRunConfig:
    """Compose conf/config.yaml with CLI-style overrides (for tests, notebooks and benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainrun.config.store import normalize_overrides, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=normalize_overrides(list(overrides or [])))
    return to_dataclass(cfg)
