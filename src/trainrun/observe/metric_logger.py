"""Fan-out of metric rows to every configured sink, on rank 0 only."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from trainrun.config.schema import LoggingConfig

# Imported for their registrations in METRIC_SINKS.
from trainrun.observe import console_sink, jsonl_sink, tensorboard_sink, wandb_sink  # noqa: F401 - registrations
from trainrun.observe.logs import warn_once
from trainrun.observe.sinks import Metrics, MetricSink
from trainrun.registry import METRIC_SINKS

logger = logging.getLogger(__name__)


class MetricLogger:
    """Sends each row to all sinks; a failing sink is reported once and skipped, not fatal.

    A wandb hiccup or a full disk for tensorboard must not kill a multi-day run, and the
    other sinks (metrics.jsonl) keep recording.
    """

    def __init__(self, sinks: dict[str, MetricSink] | None = None):
        self._sinks: dict[str, MetricSink] = dict(sinks or {})

    @property
    def names(self) -> list[str]:
        """Names of the active sinks, in order."""
        return list(self._sinks)

    @property
    def sinks(self) -> dict[str, MetricSink]:
        """The active sinks by name."""
        return dict(self._sinks)

    def log(self, metrics: Metrics, step: int) -> None:
        """Send one row of metrics for ``step`` to every sink."""
        for name, sink in self._sinks.items():
            self._guard(name, "log", sink.log, metrics, step)

    def log_config(self, config: dict[str, Any]) -> None:
        """Send the resolved run config to every sink."""
        for name, sink in self._sinks.items():
            self._guard(name, "log_config", sink.log_config, config)

    def close(self) -> None:
        """Close every sink (each at most once)."""
        sinks, self._sinks = self._sinks, {}
        for name, sink in sinks.items():
            self._guard(name, "close", sink.close)

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @staticmethod
    def _guard(name: str, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - see class docstring
            warn_once(logger, f"metric sink {name!r} failed in {what} ({type(err).__name__}: {err}); continuing")


_BUILT_IN = ("console", "jsonl", "tensorboard", "wandb")


def selected_sink_names(cfg: LoggingConfig) -> list[str]:
    """Sink names enabled by ``cfg``: each built-in by its own switch, then the extra ``cfg.sinks``."""
    switches = dict(zip(_BUILT_IN, (cfg.console, cfg.jsonl, cfg.tensorboard, cfg.wandb.enabled), strict=True))
    return [name for name, on in switches.items() if on] + list(cfg.sinks)


def build_metric_logger(cfg: LoggingConfig, run_dir: Path, is_rank0: bool) -> MetricLogger:
    """Build the sinks selected by ``cfg`` from ``METRIC_SINKS``; other ranks get none."""
    if not is_rank0:
        return MetricLogger()
    sinks: dict[str, MetricSink] = {}
    try:
        for name in selected_sink_names(cfg):
            factory = METRIC_SINKS.get(name) if name in _BUILT_IN else METRIC_SINKS.get_extra(name)
            sinks[name] = factory(cfg, run_dir)
    except BaseException:
        for sink in sinks.values():  # do not leak an open wandb run or file on a config error
            sink.close()
        raise
    logger.debug("metric sinks: %s", ", ".join(sinks) or "(none)")
    return MetricLogger(sinks)
