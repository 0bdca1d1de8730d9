"""Observability: metric sinks, throughput/MFU, phase timers, memory stats, logging, progress."""

from trainrun.observe.console_sink import (
    ConsoleSink,
    format_eval_line,
    format_train_line,
)
from trainrun.observe.jsonl_sink import JsonlSink
from trainrun.observe.logs import setup_logging, warn_once
from trainrun.observe.memory import memory_stats
from trainrun.observe.metric_logger import (
    MetricLogger,
    build_metric_logger,
    selected_sink_names,
)
from trainrun.observe.progress import NullProgressBar, log_write, progress_bar
from trainrun.observe.sinks import MetricSink
from trainrun.observe.tensorboard_sink import TensorBoardSink
from trainrun.observe.throughput import Throughput, measure_throughput, peak_flops_per_device
from trainrun.observe.timers import Timer, Timers
from trainrun.observe.wandb_sink import WandbSink, stable_run_id

__all__ = [
    "ConsoleSink",
    "JsonlSink",
    "MetricLogger",
    "MetricSink",
    "NullProgressBar",
    "TensorBoardSink",
    "Throughput",
    "Timer",
    "Timers",
    "WandbSink",
    "build_metric_logger",
    "format_eval_line",
    "format_train_line",
    "log_write",
    "measure_throughput",
    "memory_stats",
    "peak_flops_per_device",
    "progress_bar",
    "selected_sink_names",
    "setup_logging",
    "stable_run_id",
    "warn_once",
]
