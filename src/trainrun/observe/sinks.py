"""The metric sink interface that every metrics destination implements."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

from trainrun.config.schema import LoggingConfig

MetricValue: TypeAlias = float | int | str
Metrics: TypeAlias = dict[str, MetricValue]


@runtime_checkable
class MetricSink(Protocol):
    """A destination for metric rows (console, metrics.jsonl, wandb, tensorboard, plugins).

    Register a factory ``(cfg: LoggingConfig, run_dir: Path) -> MetricSink`` in
    ``trainrun.registry.METRIC_SINKS`` to make a sink selectable with ``logging.sinks``.
    """

    def log(self, metrics: Metrics, step: int) -> None:
        """Record one row of metrics for optimizer step ``step``."""
        ...

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the resolved run configuration (sinks with no use for it do nothing)."""
        ...

    def close(self) -> None:
        """Flush and release resources; called once at the end of the run."""
        ...


class MetricSinkFactory(Protocol):
    """Signature of the factories stored in ``METRIC_SINKS``."""

    def __call__(self, cfg: LoggingConfig, run_dir: Path) -> MetricSink:
        """Build a sink writing under ``run_dir``."""
        ...


def numeric_items(metrics: Metrics) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (strings and other objects dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        elif hasattr(value, "item"):  # 0-d torch tensors / numpy scalars that slipped through
            try:
                out[key] = float(value.item())
            except (TypeError, ValueError):
                pass
    return out
