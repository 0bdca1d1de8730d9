"""Turn Hydra's DictConfig into the typed ``TrainRunConfig`` and compose configs outside Hydra's main."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from trainrun.config.schema import TrainRunConfig
from trainrun.config.suggest import closest_key, unknown_key_message, unknown_keys
from trainrun.errors import ConfigError

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


def optional_group_options() -> dict[str, list[str]]:
    """The options in conf/ of each group config.yaml lists as ``optional`` (``local``: its YAML files)."""
    from trainrun.config.store import OPTIONAL_GROUPS

    return {group: sorted(p.stem for p in (config_dir() / group).glob("*.yaml")) for group in OPTIONAL_GROUPS}


def to_dataclass(cfg: DictConfig | TrainRunConfig) -> TrainRunConfig:
    """Resolve interpolations and return a plain ``TrainRunConfig`` instance.

    Raises ``ConfigError`` for a key no schema defines (one added with ``+``, e.g. ``+model.n_layer=3``):
    OmegaConf would set it as a stray attribute and the run would train with the default it meant to change.
    """
    if isinstance(cfg, TrainRunConfig):
        return cfg
    refuse_unknown_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, a missing value (???)
        raise _resolution_error(cfg, err) from None


def _resolution_error(cfg: DictConfig, err: OmegaConfBaseException) -> ConfigError:
    """``err``, raised while resolving ``cfg``, as a ``ConfigError`` naming the field and its value as written."""
    key = getattr(err, "full_key", None) or "config"
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    value = OmegaConf.to_container(node, resolve=False).get(leaf) if isinstance(node, DictConfig) else None
    what = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(key, value, f"no value given; set one ({key}=...)")
    target = re.fullmatch(r"Interpolation key '(.+)' not found", what)
    guess = closest_key(target.group(1)) if target else None
    fix = f"did you mean ${{{guess}}}?" if guess else f"fix the interpolation or set {key} directly"
    return ConfigError(key, value, f"{what}; {fix}")


def refuse_unknown_keys(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` naming the first key of ``cfg`` that no schema defines, and the closest valid one."""
    unknown = unknown_keys(cfg)
    if not unknown:
        return
    value = OmegaConf.select(cfg, unknown[0], throw_on_missing=False)
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=False)
    others = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(unknown[0], value, f"{unknown_key_message(unknown[0])}{others}")


def compose_config(overrides: list[str] | None = None) -> TrainRunConfig:
    """Compose conf/config.yaml with CLI-style overrides (for tests, notebooks and benchmarks); an override
    Hydra cannot read or a key no schema defines raises ``ConfigError`` naming the fix, as on the command line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainrun.config.store import check_overrides, normalize_overrides, register_configs

    register_configs()
    overrides = normalize_overrides(list(overrides or []))
    check_overrides(overrides, optional_group_options())
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_dataclass(cfg)
