"""Tokens/s and model FLOPs utilisation (MFU) against a per-device peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainrun.config.choices import Precision

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
    device: torch.device, override_tflops: float | None = None, precision: Precision = Precision.bf16
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and a note on where the number came from.

    ``override_tflops`` (``logging.peak_tflops``) wins. Otherwise GPUs are looked up in a table
    of dense bf16 peaks; on CPU a nominal 1 TFLOP/s is used, so MFU there only shows trends.
    """
    if override_tflops is not None:
        return override_tflops * 1e12, f"peak {override_tflops:g} TFLOP/s from logging.peak_tflops"
    if device.type != "cuda":
        return _CPU_NOMINAL_FLOPS, (
            f"{device.type}: nominal peak 1 TFLOP/s; MFU on {device.type} is indicative only "
            "(set logging.peak_tflops for a meaningful value)"
        )
    name = torch.cuda.get_device_name(device)
    peak, note = lookup_gpu_peak(name)
    return scale_peak_to_precision(peak, note, name, Precision(precision))


_FP8_GPUS = ("GB200", "B200", "B100", "GH200", "H200", "H100", "H800", "H20", "L40S", "L40", "L4", "RTX 4090",
             "MI355X", "MI325X", "MI300X")
"""GPUs with fp8 tensor cores: twice their dense bf16 rate in fp8."""


def scale_peak_to_precision(bf16_peak: float, note: str, device_name: str, precision: Precision) -> tuple[float, str]:
    """The table's dense bf16 peak turned into the peak of the precision the matmuls run in.

    fp8: twice the bf16 rate on GPUs with fp8 tensor cores. fp32: the TF32 tensor-core rate, half
    the bf16 one (matmuls in fp32 run on TF32 cores when allowed; otherwise MFU reads high).
    """
    if precision is Precision.fp8 and any(key in device_name.upper() for key in _FP8_GPUS):
        return 2 * bf16_peak, note + f"; fp8: x2 = {2 * bf16_peak / 1e12:g} TFLOP/s"
    if precision is Precision.fp32:
        return bf16_peak / 2, note + f"; fp32 (TF32 tensor cores): /2 = {bf16_peak / 2e12:g} TFLOP/s"
    return bf16_peak, note


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


@dataclass(frozen=True)
class Throughput:
    """Speed of a window of training steps, as the log line reports it."""

    tokens_per_s: float
    """Tokens per second, all devices together."""
    tflops_per_device: float
    """Achieved model TFLOP/s per device (model FLOPs only: recomputation is not counted)."""
    mfu: float
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak, as a fraction."""


def measure_throughput(tokens: int, seconds: float, flops_per_token: float, num_devices: int,
                       peak_flops: float) -> Throughput:
    """Throughput of ``tokens`` processed by ``num_devices`` devices in ``seconds`` (PaLM's MFU definition).

    Dividing the aggregate FLOP/s by the device count gives the per-device figure, so MFU is the
    same whether it is read per device or for the whole job.
    """
    if num_devices < 1 or peak_flops <= 0:
        raise ValueError(f"num_devices must be >= 1 and peak_flops > 0, got {num_devices} and {peak_flops}")
    tokens_per_s = tokens / max(seconds, 1e-9)
    per_device_flops = tokens_per_s * flops_per_token / num_devices
    return Throughput(tokens_per_s, per_device_flops / 1e12, per_device_flops / peak_flops)
