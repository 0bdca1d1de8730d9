"""The GPU benchmark, one command, under 8 minutes on one GPU:

1. launch-bound model (``gpt_tiny``, micro-batch 4 x 256 tokens, bf16): eager vs compile (per block,
   whole model) vs cuda_graph, seconds per step through trainrun's loop (``benchmarks/executors.py``);
   goal: cuda_graph >= 1.5x eager.
2. ``gpt_1b`` (GPT-3 XL shape, 1.3B parameters, vocabulary 50304, 2048 tokens) in bf16 with the
   compile executor: tokens/s and MFU against the GPU's dense bf16 peak; goal >= 45% on an H100
   (published: Megatron-LM 41% for 1.7B, llm-foundry 40.6% for 1B, torchtitan 33-39% for Llama-3 8B).

    python benchmarks/gpu.py [--steps 10] [--rounds 3] [--skip-1b]

Without CUDA it says so and exits 0. Prints tables and one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from executors import build_loop, compare, print_table, time_steps  # noqa: E402 - sibling benchmark module

from trainrun.model import flops_per_token  # noqa: E402
from trainrun.observe.throughput import peak_flops_per_device  # noqa: E402

LAUNCH_BOUND = ["model=gpt_tiny", "data.seq_len=256", "train.micro_batch_size=4", "train.global_batch_size=4",
                "train.precision=bf16"]
GPT_1B = ["+experiment=gpt_1b", "model.vocab_size=50304", "data.seq_len=2048", "train.precision=bf16",
          "train.step_executor=compile", "train.compile.scope=blocks", "optim.implementation=fused"]


def measure_1b(micro_batch: int, steps: int, warmup: int, root: Path) -> dict:
    """Tokens/s and MFU of gpt_1b at ``micro_batch`` x 2048 tokens (no accumulation)."""
    loop = build_loop([*GPT_1B, f"train.micro_batch_size={micro_batch}",
                       f"train.global_batch_size={micro_batch}", "run.device=cuda"], root / "gpt_1b")
    time_steps(loop, warmup, "cuda")
    torch.cuda.reset_peak_memory_stats()
    s_per_step = time_steps(loop, steps, "cuda")
    cfg = loop.cfg
    tokens = micro_batch * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, note = peak_flops_per_device(torch.device("cuda"), None, cfg.train.precision)
    loop.components.metrics.close()
    return {"micro_batch": micro_batch, "seq_len": cfg.data.seq_len, "s_per_step": s_per_step,
            "tokens_per_s": tokens / s_per_step, "tflops": tokens * fpt / s_per_step / 1e12,
            "mfu": tokens * fpt / s_per_step / peak, "peak_note": note,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch-1b", type=int, default=8)
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine; nothing to measure "
              "(the CPU figures come from benchmarks/executors.py and benchmarks/overhead.py)")
        return
    device = torch.cuda.get_device_name()
    print(f"device: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trainrun-gpu-bench-") as tmp:
        root = Path(tmp)
        names = ["eager", "compile_blocks", "compile_model", "cuda_graph"]
        results = compare(names, LAUNCH_BOUND, "cuda", args.steps, args.rounds, args.warmup, root)
        print_table(f"launch-bound gpt_tiny, bf16, 4 x 256 tokens ({device})", results)
        for name, r in results.items():
            print(json.dumps({"benchmark": "gpu_executors", "device": device, "executor": name, **r}))
        if not args.skip_1b:
            for micro_batch in (args.micro_batch_1b, max(1, args.micro_batch_1b // 2)):
                try:
                    r = measure_1b(micro_batch, args.steps, args.warmup, root)
                    break
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"gpt_1b: micro-batch {micro_batch} does not fit; halving")
            print(f"\ngpt_1b bf16 compile(blocks), {r['micro_batch']} x {r['seq_len']} tokens: "
                  f"{r['tokens_per_s']:.0f} tokens/s, {r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% "
                  f"({r['peak_note']}), peak memory {r['peak_mem_gib']:.1f} GiB")
            print(json.dumps({"benchmark": "gpu_gpt_1b", "device": device, **r}))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
