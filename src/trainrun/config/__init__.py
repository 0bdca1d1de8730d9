"""Typed configuration: schemas, ConfigStore registration, validation and conversion."""

from trainrun.config.convert import compose_config, to_dataclass
from trainrun.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    TrainRunConfig,
    WandbConfig,
)
from trainrun.config.store import register_configs
from trainrun.config.validate import validate_config
from trainrun.errors import ConfigError

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "LoggingConfig", "ModelConfig",
    "OptimConfig", "ParallelConfig", "RunConfig", "TrainConfig", "TrainRunConfig", "WandbConfig",
    "compose_config", "register_configs", "to_dataclass", "validate_config",
]
