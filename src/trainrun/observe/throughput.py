"""Tokens/s and model FLOPs utilisation (MFU) against a per-device peak."""

from __future__ import annotations

import time
from collections import deque

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from vendor datasheets.
# Matched by substring on torch.cuda.get_device_name in order, so specific names
# ("H100 PCIe", "L40S", "A100") come before names they contain ("H100", "L40", "A10").
_PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM and other variants
    ("H800 PCIE", 756e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # no bf16: fp16 tensor-core peak
    ("T4", 65e12),  # no bf16: fp16 tensor-core peak
    ("MI355X", 2.5e15),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]
_CPU_NOMINAL_FLOPS = 1e12
_UNKNOWN_GPU_FLOPS = 312e12


def peak_flops_per_device(
    device: torch.device, override_tflops: float | None = None, precision: str = "bf16"
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and a note on where the number came from.

    ``override_tflops`` (``logging.peak_tflops``) wins. Otherwise GPUs are looked up in a table
    of dense bf16 peaks; on CPU a nominal 1 TFLOP/s is used, so MFU there only shows trends.
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"logging.peak_tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12, f"peak {override_tflops:g} TFLOP/s from logging.peak_tflops"
    if device.type != "cuda":
        return _CPU_NOMINAL_FLOPS, (
            f"{device.type}: nominal peak 1 TFLOP/s; MFU on {device.type} is indicative only "
            "(set logging.peak_tflops for a meaningful value)"
        )
    name = torch.cuda.get_device_name(device)
    peak, note = lookup_gpu_peak(name)
    if precision == "fp32":
        note += "; training in fp32, so MFU is against the bf16 peak and will look low"
    return peak, note


def lookup_gpu_peak(device_name: str) -> tuple[float, str]:
    """Table lookup of a GPU's dense bf16 peak by its CUDA device name."""
    upper = device_name.upper()
    for key, peak in _PEAK_BF16_FLOPS:
        if key in upper:
            return peak, f"{device_name}: dense bf16 peak {peak / 1e12:g} TFLOP/s"
    return _UNKNOWN_GPU_FLOPS, (
        f"{device_name}: unknown GPU, assuming A100's {_UNKNOWN_GPU_FLOPS / 1e12:g} TFLOP/s; "
        "set logging.peak_tflops"
    )


class ThroughputMeter:
    """Sliding-window tokens/s and MFU.

    ``tokens`` passed to ``update`` are the tokens processed by all ``num_devices`` devices in
    that step; MFU divides by the aggregate peak, which equals per-device MFU.
    """

    def __init__(self, flops_per_token: float, peak_flops: float, window: int = 20, num_devices: int = 1):
        if peak_flops <= 0 or num_devices < 1 or window < 1:
            raise ValueError("peak_flops must be > 0, num_devices >= 1 and window >= 1")
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self._steps: deque[tuple[float, int]] = deque(maxlen=window)
        self._last_tick: float | None = None

    def update(self, step_time_s: float, tokens: int) -> None:
        """Record one step that took ``step_time_s`` seconds and processed ``tokens`` tokens."""
        if step_time_s < 0:
            raise ValueError(f"step time must be >= 0, got {step_time_s}")
        self._steps.append((step_time_s, tokens))

    def tick(self, tokens: int) -> None:
        """Record a step ending now, timed with ``time.perf_counter`` since the previous tick.

        The first tick only starts the clock (the time before it is unknown).
        """
        now = time.perf_counter()
        if self._last_tick is not None:
            self.update(now - self._last_tick, tokens)
        self._last_tick = now

    def reset(self) -> None:
        """Drop the window, e.g. after an evaluation or checkpoint pause that is not training time."""
        self._steps.clear()
        self._last_tick = None

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over the window, all devices together (0 before any step)."""
        seconds = sum(t for t, _ in self._steps)
        return sum(n for _, n in self._steps) / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_s_per_device(self) -> float:
        """Tokens per second per device over the window."""
        return self.tokens_per_s / self.num_devices

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation as a fraction: achieved model FLOP/s over peak FLOP/s."""
        return self.tokens_per_s * self.flops_per_token / (self.peak_flops * self.num_devices)
