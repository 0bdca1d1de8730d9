"""Registers the dataclass schemas in Hydra's ConfigStore (called explicitly, not on import)."""

from __future__ import annotations

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
}
"""Config group name -> its schema; YAML files in conf/<group>/ extend ``base_<group>``."""


def register_configs() -> None:
    """Store ``base_config`` and one ``base_<group>`` schema per group, as Hydra's tutorial 5.2 does."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=schema.TrainRunConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
