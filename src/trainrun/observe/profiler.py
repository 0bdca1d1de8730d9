"""A torch profiler trace of a window of training steps (``debug.profile_steps``), written to the run dir."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

import torch

logger = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class StepProfiler:
    """Traces ``active_steps`` steps after ``wait_steps`` (+1 warm-up) into ``<run_dir>/profile/``.

    Use as a context manager around the loop and call :meth:`step` after each optimizer step; with
    ``active_steps=0`` both are no-ops. Each rank writes its own Chrome trace
    (``trace_rank<R>_step<N>.json``, viewable in Perfetto or chrome://tracing).
    """

    def __init__(self, run_dir: Path, active_steps: int, wait_steps: int = 2, rank: int = 0,
                 device_type: str = "cpu", memory_snapshot: bool = False):
        self.trace_dir = run_dir / PROFILE_DIR
        self.rank = rank
        self.memory_snapshot = memory_snapshot and device_type == "cuda"
        """Record CUDA allocations from the start and dump them at the end (``debug.memory_snapshot``)."""
        self.snapshot_path: Path | None = None
        self._profiler: torch.profiler.profile | None = None
        if active_steps > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device_type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=wait_steps, warmup=1, active=active_steps, repeat=1),
                on_trace_ready=self._write_trace,
                record_shapes=True,
            )
        self.traces: list[Path] = []

    def _write_trace(self, profiler: torch.profiler.profile) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / f"trace_rank{self.rank}_step{profiler.step_num}.json"
        profiler.export_chrome_trace(str(path))
        self.traces.append(path)
        logger.info("profiler trace written to %s", path)

    def step(self) -> None:
        """Mark the end of one training step."""
        if self._profiler is not None:
            self._profiler.step()

    def __enter__(self) -> StepProfiler:
        if self.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if self._profiler is not None:
            self._profiler.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(exc_type, exc, tb)
        if self.memory_snapshot:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            self.snapshot_path = self.trace_dir / f"memory_snapshot_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
            logger.info("CUDA memory snapshot written to %s (open it at https://pytorch.org/memory_viz)",
                        self.snapshot_path)
