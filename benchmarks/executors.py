"""Step executors side by side: eager vs compile (per block, whole model) vs cuda_graph, one device.

Each executor trains the same model from the same initialisation on the same batches through
trainrun's own loop (``TrainingLoop.train_step``: data, executor, bookkeeping). Timed steps run in
rounds that alternate between executors, so machine noise hits all of them; the result is each
executor's median seconds per step and its speed-up over eager. Warm-up steps (compilation, CUDA
graph capture) are not timed.

    python benchmarks/executors.py [--device cpu|cuda] [--steps 10] [--rounds 3] [--warmup 5] [override ...]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainrun.config import compose_config, validate_config
from trainrun.data.sources import open_sources
from trainrun.distributed.initializers import init_single
from trainrun.orchestrator import build_training_loop, resolve_vocab

CPU_OVERRIDES = ["model.n_layers=4", "model.d_model=256", "model.n_heads=8", "data.seq_len=128",
                 "train.micro_batch_size=8", "train.global_batch_size=8"]
"""A model whose CPU step takes ~0.1 s: long enough to time, short enough for several rounds."""
COMMON = ["train.max_steps=100000", "train.log_interval=100000", "train.progress_bar=false", "eval.interval=0",
          "checkpoint.interval=0", "checkpoint.save_final=false", "logging.console=false", "logging.jsonl=false",
          "checkpoint.resume=never", "data.max_documents=400"]
EXECUTORS = {
    "eager": ["train.step_executor=eager"],
    "compile_blocks": ["train.step_executor=compile", "train.compile.scope=blocks"],
    "compile_model": ["train.step_executor=compile", "train.compile.scope=model"],
    "cuda_graph": ["train.step_executor=cuda_graph"],
}


def build_loop(overrides: list[str], run_dir: Path):
    """A real TrainingLoop for ``overrides`` (one process)."""
    cfg = compose_config([*COMMON, *overrides])
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    dataset = open_sources(cfg.data)
    return build_training_loop(resolve_vocab(cfg, dataset), env, dataset, run_dir)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(loop, steps: int, device: str) -> float:
    """Seconds per step over ``steps`` steps (the device drained at both ends)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.train_step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def compare(names: list[str], overrides: list[str], device: str, steps: int, rounds: int, warmup: int,
            root: Path) -> dict[str, dict[str, float]]:
    """Median seconds per step of each executor in ``names``, and the speed-up over the first."""
    loops = {}
    for name in names:
        torch.manual_seed(0)
        loops[name] = build_loop([f"run.device={device}", *overrides, *EXECUTORS[name]], root / name)
        time_steps(loops[name], warmup, device)  # compile, capture, allocator warm-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            samples[name].append(time_steps(loops[name], steps, device))
    for loop in loops.values():
        loop.components.metrics.close()
    base = statistics.median(samples[names[0]])
    return {name: {"s_per_step": statistics.median(s), "speedup_vs_" + names[0]: base / statistics.median(s),
                   "rounds": s} for name, s in samples.items()}


def print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'executor':<16} {'ms/step (median)':>17} {'speed-up':>9}")
    for name, r in results.items():
        speed = next(v for k, v in r.items() if k.startswith("speedup_vs_"))
        print(f"{name:<16} {r['s_per_step'] * 1e3:>17.2f} {speed:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: a 4-layer d=256 model)")
    args = parser.parse_args()
    names = ["eager", "compile_blocks", "compile_model"] + (["cuda_graph"] if args.device == "cuda" else [])
    overrides = args.overrides or CPU_OVERRIDES
    with tempfile.TemporaryDirectory(prefix="trainrun-bench-") as root:
        results = compare(names, overrides, args.device, args.steps, args.rounds, args.warmup, Path(root))
    print_table(f"device {args.device}, torch threads {torch.get_num_threads()}, overrides {overrides}", results)
    print(json.dumps({"benchmark": "executors", "device": args.device, "overrides": overrides, "steps": args.steps,
                      "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
