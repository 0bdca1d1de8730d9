"""JSON-lines sink: ``<run_dir>/metrics.jsonl``, one object per logged row."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainrun.config.schema import LoggingConfig
from trainrun.observe.sinks import Metrics
from trainrun.registry import METRIC_SINKS

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # 0-d tensors / numpy scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/Infinity are not JSON; strict parsers (jq, pandas) reject them
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


class JsonlSink:
    """Appends ``{"step": step, **metrics}`` rows to a file, flushed per row.

    The file is opened in append mode so a resumed run continues it; rows for steps re-run
    after a resume therefore appear twice, and readers should keep the last row per step.
    Non-finite floats are written as ``null``.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the sink
        if needs_newline:
            # A run killed mid-write leaves a partial row; start ours on a fresh line.
            self._file.write("\n")

    def log(self, metrics: Metrics, step: int) -> None:
        """Write one row and flush it, so a killed run keeps every completed row."""
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        """The run directory keeps the config itself; nothing to do."""

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


@METRIC_SINKS.register("jsonl", switch="logging.jsonl")
def build_jsonl_sink(cfg: LoggingConfig, run_dir: Path) -> JsonlSink:
    """Registry factory for :class:`JsonlSink` writing ``<run_dir>/metrics.jsonl``."""
    return JsonlSink(run_dir / METRICS_FILE)
