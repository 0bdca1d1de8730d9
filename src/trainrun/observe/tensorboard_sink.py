"""TensorBoard sink: scalar summaries in ``<run_dir>/tensorboard``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainrun.config.schema import LoggingConfig
from trainrun.extras import require
from trainrun.observe.sinks import Metrics, numeric_items
from trainrun.registry import METRIC_SINKS

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Writes every numeric metric as a scalar; strings are skipped."""

    def __init__(self, log_dir: Path):
        # Imported here: tensorboard is an extra, pulls in a lot and is off by default.
        require("tensorboard", "tensorboard", "logging.tensorboard=true (logging=tensorboard)")
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Metrics, step: int) -> None:
        """Add one scalar per numeric metric at ``step``."""
        for key, value in numeric_items(metrics).items():
            self._writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        """Show the config in TensorBoard's text tab."""
        text = json.dumps(config, indent=2, default=str)
        # Indented by 4 spaces so TensorBoard's markdown renders it as a code block.
        self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


@METRIC_SINKS.register("tensorboard", switch="logging.tensorboard")
def build_tensorboard_sink(cfg: LoggingConfig, run_dir: Path) -> TensorBoardSink:
    """Registry factory for :class:`TensorBoardSink` writing ``<run_dir>/tensorboard``."""
    return TensorBoardSink(run_dir / TENSORBOARD_DIR)
