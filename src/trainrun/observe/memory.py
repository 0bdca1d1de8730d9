"""Device memory statistics for the metrics stream."""

from __future__ import annotations

import os
import resource
import sys

import torch

GIB = float(1 << 30)


def memory_stats(device: torch.device, reset_peak: bool = True) -> dict[str, float]:
    """Memory use in GiB: ``mem_gib`` is the headline number, extra keys depend on the device.

    CUDA: ``mem_gib`` = peak allocated, ``mem_reserved_gib`` = peak reserved by the caching
    allocator, since the previous call (peaks are reset so each log interval shows its own).
    CPU and others: ``mem_gib`` = current process RSS, ``mem_peak_gib`` = lifetime peak RSS.
    """
    if device.type == "cuda" and torch.cuda.is_available():
        stats = {
            "mem_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return stats
    stats = {"mem_peak_gib": _peak_rss_bytes() / GIB}
    rss = _current_rss_bytes()
    stats["mem_gib"] = rss / GIB if rss is not None else stats["mem_peak_gib"]
    return stats


def _current_rss_bytes() -> int | None:
    # /proc is Linux-only; elsewhere the caller falls back to the peak RSS.
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024
