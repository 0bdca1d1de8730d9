"""Turn Hydra's DictConfig into the typed ``TrainRunConfig`` and compose configs outside Hydra's main."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from trainrun.config.schema import TrainRunConfig

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
"""conf/ of a source checkout; installed wheels ship a copy as package data (trainrun/conf)."""


def config_dir() -> Path:
    """The directory holding config.yaml: the checkout's conf/ or the packaged copy."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return CONF_DIR if (CONF_DIR / "config.yaml").is_file() else packaged


def to_dataclass(cfg: DictConfig | TrainRunConfig) -> TrainRunConfig:
    """Resolve interpolations and return a plain ``TrainRunConfig`` instance."""
    if isinstance(cfg, TrainRunConfig):
        return cfg
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def compose_config(overrides: list[str] | None = None) -> TrainRunConfig:
    """Compose conf/config.yaml with CLI-style overrides (for tests, notebooks and benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainrun.config.store import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return to_dataclass(cfg)
