"""The metric sink interface that every metrics destination implements."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, TypeAlias, runtime_checkable

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


def numeric_items(metrics: Metrics) -> dict[str, float]:
    """The numeric entries of ``metrics`` as floats (strings and other objects dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
        elif hasattr(value, "item"):  # 0-d torch tensors / numpy scalars that slipped through
            with contextlib.suppress(TypeError, ValueError):
                out[key] = float(value.item())
    return out
