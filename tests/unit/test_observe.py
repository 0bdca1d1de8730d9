"""Tests for trainrun.observe: sinks, fan-out, timers, throughput, memory, logging."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import trainrun.registry as registry
from tests.helpers.wandb_records import (
    history_rows,
    read_finished_wandb_file,
)
from trainrun.config.schema import LoggingConfig, WandbConfig
from trainrun.observe import (
    ConsoleSink,
    JsonlSink,
    TensorBoardSink,
    Timers,
    build_metric_logger,
    format_eval_line,
    format_train_line,
    log_write,
    measure_throughput,
    memory_stats,
    peak_flops_per_device,
    progress_bar,
    setup_logging,
    warn_once,
)
from trainrun.observe.progress import NullProgressBar
from trainrun.observe.throughput import lookup_gpu_peak


@pytest.fixture(autouse=True)
def _no_component_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    # trainrun.components is built elsewhere; the observe sinks register themselves on import.
    monkeypatch.setattr(registry, "_plugins_loaded", True)


# --- jsonl -----------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_writes_one_object_per_call_and_appends_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log({"loss": 2.5, "lr": 1e-3, "note": "warmup"}, step=1)
    sink.log({"loss": 2.25}, step=2)
    # Flushed per row: readable before close, as after a kill.
    assert [r["step"] for r in _rows(path)] == [1, 2]
    sink.close()

    resumed = JsonlSink(path)
    resumed.log({"loss": 2.0, "bad": float("nan")}, step=3)
    resumed.close()
    rows = _rows(path)
    assert rows == [
        {"step": 1, "loss": 2.5, "lr": 1e-3, "note": "warmup"},
        {"step": 2, "loss": 2.25},
        {"step": 3, "loss": 2.0, "bad": None},
    ]
    assert isinstance(rows[0]["loss"], float)


def test_jsonl_recovers_from_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')  # killed mid-write
    sink = JsonlSink(path)
    sink.log({"loss": 2.0}, step=2)
    sink.close()
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 2, "loss": 2.0}


# --- console ---------------------------------------------------------------------------------


def test_console_train_line_has_expected_fields(caplog: pytest.LogCaptureFixture) -> None:
    sink = ConsoleSink()
    sink.log_config({"train": {"max_steps": 300}})
    metrics = {
        "loss": 2.34119,
        "lr": 9.8e-4,
        "grad_norm": 0.8123,
        "tokens_per_s": 45213.0,
        "mfu": 0.1234,
        "time_data": 1.23,
        "time_step": 180.44,
        "mem_gib": 1.234,
    }
    with caplog.at_level(logging.INFO, logger="trainrun.metrics"):
        sink.log(metrics, step=120)
    (record,) = [r for r in caplog.records if r.name == "trainrun.metrics"]
    assert record.getMessage() == (
        "step   120/300 | loss 2.3412 | lr 9.8e-04 | grad 0.812 | 45.2k tok/s | MFU 12.3% "
        "| data 1.2ms step 180.4ms | mem 1.23GiB"
    )


def test_console_formats_only_present_keys_and_eval_rows() -> None:
    line = format_train_line({"loss": 1.5}, step=7)
    assert line == "step     7 | loss 1.5000"
    assert "lr" not in line and "MFU" not in line
    assert format_eval_line({"val_loss": 2.41}, step=100) == "eval step 100 | val_loss 2.4100 | ppl 11.13"
    assert "ppl 12.00" in format_eval_line({"val_loss": 2.41, "val_ppl": 12.0}, step=100)


# --- wandb (offline) -------------------------------------------------------------------------


def test_wandb_offline_logs_are_readable_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run-7"
    cfg = LoggingConfig(console=False, jsonl=False, wandb=WandbConfig(enabled=True, mode="offline", project="t"))

    metric_logger = build_metric_logger(cfg, run_dir, is_rank0=True)
    assert metric_logger.names == ["wandb"]
    metric_logger.log_config({"train": {"max_steps": 3}, "optim": {"lr": 1e-3}})
    for step, loss in enumerate([3.0, 2.5, 2.125], start=1):
        metric_logger.log({"loss": loss, "lr": 1e-3 * step}, step=step)
    metric_logger.close()

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (offline_dir,) = (run_dir / "wandb").glob("offline-run-*")
    assert offline_dir.name.endswith(f"-{run_id}")
    wandb_file = offline_dir / f"run-{run_id}.wandb"
    records = read_finished_wandb_file(wandb_file)
    assert wandb_file.stat().st_size > 7

    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_id
    assert run_record.project == "t"
    assert run_record.display_name == "run-7"

    rows = history_rows(records)
    assert [(row["_step"], row["loss"], row["lr"]) for row in rows] == [
        (1, 3.0, 1e-3),
        (2, 2.5, 2e-3),
        (3, 2.125, 3e-3),
    ]
    config_updates = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config_updates["train"] == {"max_steps": 3}

    # A resumed run reuses the id, so wandb continues the same run.
    resumed = build_metric_logger(cfg, run_dir, is_rank0=True)
    resumed.log({"loss": 2.0}, step=4)
    resumed.close()
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    # Each wandb.init writes a new offline-run-<time>-<id>[-N] dir ("-N" when started in the same second).
    resumed_dirs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(resumed_dirs) == 2, "the resumed run must write under the same run id"
    all_rows = [
        row for d in resumed_dirs for row in history_rows(read_finished_wandb_file(d / f"run-{run_id}.wandb"))
    ]
    assert any(row["_step"] == 4 and row["loss"] == 2.0 for row in all_rows)


# --- tensorboard -----------------------------------------------------------------------------


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tensorboard")
    sink.log_config({"train": {"max_steps": 2}})
    sink.log({"loss": 3.5, "lr": 1e-3, "phase": "warmup"}, step=1)
    sink.log({"loss": 3.25, "lr": 2e-3}, step=2)
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr"}
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.5), (2, 3.25)]
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-3, 2e-3])


# --- fan-out ---------------------------------------------------------------------------------


def test_non_rank0_gets_no_sinks(tmp_path: Path) -> None:
    cfg = LoggingConfig(tensorboard=True, wandb=WandbConfig(enabled=True))
    metric_logger = build_metric_logger(cfg, tmp_path / "run", is_rank0=False)
    assert metric_logger.names == []
    metric_logger.log({"loss": 1.0}, step=1)
    metric_logger.close()
    assert not (tmp_path / "run").exists()


def test_rank0_builds_configured_sinks_and_fans_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = LoggingConfig(console=True, jsonl=True, tensorboard=True, sinks=["jsonl"])
    with (
        caplog.at_level(logging.INFO, logger="trainrun.metrics"),
        build_metric_logger(cfg, tmp_path, is_rank0=True) as metric_logger,
    ):
        assert metric_logger.names == ["console", "jsonl", "tensorboard"]
        metric_logger.log({"loss": 1.25}, step=5)
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 5, "loss": 1.25}]
    assert any("loss 1.2500" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_unknown_sink_name_lists_registered(tmp_path: Path) -> None:
    cfg = LoggingConfig(console=False, jsonl=False, sinks=["nope"])
    with pytest.raises(registry.UnknownComponentError, match="logging.sinks='nope'.*jsonl"):
        build_metric_logger(cfg, tmp_path, is_rank0=True)


def test_plugin_sink_from_registry_and_failing_sink_is_isolated(tmp_path: Path) -> None:
    seen: list[tuple[dict, int]] = []

    class Recorder:
        def log(self, metrics, step):
            seen.append((metrics, step))

        def log_config(self, config):
            pass

        def close(self):
            pass

    class Broken(Recorder):
        def log(self, metrics, step):
            raise OSError("disk full")

    registry.METRIC_SINKS.register("test_recorder", lambda cfg, run_dir: Recorder(), override=True)
    registry.METRIC_SINKS.register("test_broken", lambda cfg, run_dir: Broken(), override=True)
    cfg = LoggingConfig(console=False, jsonl=False, sinks=["test_broken", "test_recorder"])
    metric_logger = build_metric_logger(cfg, tmp_path, is_rank0=True)
    metric_logger.log({"loss": 1.0}, step=1)
    metric_logger.log({"loss": 0.5}, step=2)
    metric_logger.close()
    assert seen == [({"loss": 1.0}, 1), ({"loss": 0.5}, 2)]


# --- timers ----------------------------------------------------------------------------------


def test_timers_accumulate_and_average_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.010, 1.0, 1.030, 2.0, 2.5])  # perf_counter readings
    monkeypatch.setattr("trainrun.observe.timers.time.perf_counter", lambda: next(clock))
    timers = Timers()
    timers("data").start()
    timers("data").stop()  # 10 ms
    with timers.time("data"):  # 30 ms
        pass
    with timers.time("forward_backward"):  # 500 ms
        pass
    assert timers.as_dict(steps=2) == pytest.approx({"time_data": 20.0, "time_forward_backward": 250.0})
    assert timers.as_dict() == {}  # reset by the previous call


def test_timers_average_over_intervals_without_steps_and_misuse_raises() -> None:
    timers = Timers()
    for _ in range(3):
        with timers.time("x"):
            pass
    assert timers("x").count == 3
    assert set(timers.as_dict(prefix="t/")) == {"t/x"}
    with pytest.raises(RuntimeError, match="without being started"):
        timers("y").stop()
    timers("y").start()
    with pytest.raises(RuntimeError, match="already running"):
        timers("y").start()


# --- throughput ------------------------------------------------------------------------------


def test_measure_throughput_tokens_per_s_and_mfu() -> None:
    speed = measure_throughput(tokens=8192, seconds=2.0, flops_per_token=6e6, num_devices=1, peak_flops=1e12)
    assert speed.tokens_per_s == pytest.approx(4096)
    assert speed.mfu == pytest.approx(4096 * 6e6 / 1e12)
    assert speed.tflops_per_device == pytest.approx(4096 * 6e6 / 1e12)
    # Four devices processing four times the tokens in the same time: same MFU, same per-device TFLOP/s.
    dp = measure_throughput(tokens=4 * 8192, seconds=2.0, flops_per_token=6e6, num_devices=4, peak_flops=1e12)
    assert dp.tokens_per_s == pytest.approx(4 * 4096)
    assert dp.mfu == pytest.approx(speed.mfu) and dp.tflops_per_device == pytest.approx(speed.tflops_per_device)
    with pytest.raises(ValueError):
        measure_throughput(1, 1.0, 1.0, num_devices=0, peak_flops=1.0)


def test_peak_flops_lookup() -> None:
    flops, note = peak_flops_per_device(torch.device("cpu"), None)
    assert flops == 1e12 and "indicative" in note
    assert peak_flops_per_device(torch.device("cpu"), 2.5)[0] == pytest.approx(2.5e12)
    assert lookup_gpu_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert lookup_gpu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert lookup_gpu_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert lookup_gpu_peak("NVIDIA H200")[0] == 989e12
    assert lookup_gpu_peak("NVIDIA L40S")[0] == 362e12
    assert lookup_gpu_peak("NVIDIA L4")[0] == 121e12
    assert "unknown" in lookup_gpu_peak("Mystery GPU")[1]


# --- memory, logging, progress ---------------------------------------------------------------


def test_cpu_memory_stats_report_rss() -> None:
    stats = memory_stats(torch.device("cpu"))
    assert 0.001 < stats["mem_gib"] < 1024
    assert stats["mem_peak_gib"] >= stats["mem_gib"] * 0.5


def test_setup_logging_file_prefix_and_rank_filter(tmp_path: Path) -> None:
    log_file = tmp_path / "train.log"
    logger = setup_logging("INFO", rank=1, all_ranks=True, log_file=log_file)
    try:
        logging.getLogger("trainrun.x").info("hello")
        warn_once(logger, "careful")
        warn_once(logger, "careful")
        for handler in logger.handlers:
            handler.flush()
        text = log_file.read_text()
        assert "[rank 1]" in text and "hello" in text
        assert text.count("careful") == 1

        quiet = setup_logging("INFO", rank=1, all_ranks=False, log_file=tmp_path / "rank1.log")
        logging.getLogger("trainrun.x").info("not shown")
        assert quiet.getEffectiveLevel() == logging.ERROR
        assert not (tmp_path / "rank1.log").exists()
        with pytest.raises(ValueError, match="not a log level"):
            setup_logging("LOUD", rank=0, all_ranks=False, log_file=None)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_progress_bar_is_noop_without_tty(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress_bar(total=10, initial=3, enabled=True)  # pytest's stderr is not a TTY
    assert isinstance(bar, NullProgressBar)
    bar.update(2)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert bar.n == 5
    log_write("a line")
    assert capsys.readouterr().err == "a line\n"


def test_mfu_formula_matches_console_percentage() -> None:
    speed = measure_throughput(123_000, 1.0, flops_per_token=1e6, num_devices=1, peak_flops=1e12)
    assert math.isclose(speed.mfu, 0.123)
    assert "MFU 12.3%" in format_train_line({"mfu": speed.mfu}, step=1)


def test_train_line_shows_each_figure_once_and_formatted():
    row = {"loss": 2.5, "lr": 3e-4, "grad_norm": 1.25, "tokens_per_s": 12345.0, "mfu": 0.4321,
           "tflops_per_device": 98.7654, "consumed_tokens": 1_234_567, "skipped_steps": 2, "time_data": 1.5,
           "time_step": 40.0, "mem_gib": 12.5, "mem_reserved_gib": 14.0}
    line = format_train_line(row, step=120, total_steps=300)
    assert line == ("step   120/300 | loss 2.5000 | lr 3.0e-04 | grad 1.250 | 12.3k tok/s | MFU 43.2% | "
                    "data 1.5ms step 40.0ms | 98.8 TFLOP/s/dev | mem 12.50GiB | 1.2M tokens | skipped 2")
    quiet = format_train_line({**row, "skipped_steps": 0}, step=1)
    assert "skipped" not in quiet and "_" not in quiet.replace("step ", "")  # no raw keys trail the line


def test_mfu_peak_follows_the_precision():
    from trainrun.config.choices import Precision
    from trainrun.observe.throughput import lookup_gpu_peak, scale_peak_to_precision

    bf16, note = lookup_gpu_peak("NVIDIA H100 80GB HBM3")
    assert bf16 == pytest.approx(989e12)
    assert scale_peak_to_precision(bf16, note, "NVIDIA H100 80GB HBM3", Precision.fp8)[0] == pytest.approx(2 * 989e12)
    assert scale_peak_to_precision(bf16, note, "NVIDIA H100 80GB HBM3", Precision.fp32)[0] == pytest.approx(989e12 / 2)
    a100, note = lookup_gpu_peak("NVIDIA A100-SXM4-80GB")
    assert scale_peak_to_precision(a100, note, "NVIDIA A100-SXM4-80GB", Precision.fp8)[0] == a100  # no fp8 cores
