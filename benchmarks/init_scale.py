"""Initialisation at scale: peak host memory per rank and start-up time of building a sharded model.

Each case launches ``torchrun --nproc-per-node N`` (gloo, CPU) on this file; every rank runs the real
start-up path, ``trainrun.orchestrator.build_model_and_optimizer`` (meta build, parallelise, allocate
the shards, initialise, optimizers), for ``--experiment`` under ``--layout``, and reports its peak
resident memory (``ru_maxrss``) before and after, and the seconds the build took. Two cases:

* ``full``: the model's ``init_plan`` hidden, so trainrun takes its path for a model without one:
  rank 0 builds the whole model in host memory from the seed and broadcasts it (what every model
  did before init was streamed);
* ``streamed``: ``init_plan`` applied parameter by parameter: rank 0 draws one full parameter at a
  time and sends it to its owners.

Both cases give the same weights (the layout tests check the streamed one against one process).
Cases run one after the other, each in fresh processes; their order alternates with ``--repeats``.

    python benchmarks/init_scale.py [--experiment gpt_1b] [--layout parallel.dp_shard=2] [--repeats 1]

Prints a table and one JSON line. Goal: the streamed peak above the ranks' baseline is about one
shard plus one parameter, not the full model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20
CASES = ("full", "streamed")


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> None:
    """One rank: build the configured model under torchrun and write what it measured to ``args.out``."""
    import torch

    from trainrun import registry
    from trainrun.config import compose_config, validate_config
    from trainrun.distributed.parallel_dims import ParallelDims
    from trainrun.model import count_parameters
    from trainrun.orchestrator import build_model_and_optimizer

    torch.set_num_threads(1)
    cfg = compose_config([f"+experiment={args.experiment}", *args.layout.split(),
                          f"model.vocab_size={args.vocab_size}", "run.device=cpu"])
    world = int(os.environ["WORLD_SIZE"])
    validate_config(cfg, world)
    env = registry.INITIALIZERS.get("torchrun")(cfg)
    try:
        dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.rank)
        dims.build_mesh(env.device.type)
        if args.case == "full":  # trainrun's path for a model without a plan
            importlib.import_module("trainrun.distributed.parallelize").init_plan_of = lambda model: None
        env.barrier()
        baseline = peak_rss_mb()
        start = time.perf_counter()
        built = build_model_and_optimizer(cfg, env, dims)
        env.barrier()
        seconds = time.perf_counter() - start
        local_bytes = sum(_local(p).numel() * p.element_size() for part in built.model_parts
                          for p in part.parameters())
        n_params = count_parameters(cfg.model)
        row = {"case": args.case, "rank": env.rank, "baseline_mb": baseline, "peak_mb": peak_rss_mb(),
               "startup_s": seconds, "params": n_params, "full_model_mb": n_params * 4 / MB,
               "local_shard_mb": local_bytes / MB}  # this rank's parameters: its shards (its stages under PP)
        Path(args.out, f"rank{env.rank}.json").write_text(json.dumps(row))
    finally:
        env.close(True)


def _local(param):
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def run_case(case: str, args: argparse.Namespace, nproc: int) -> list[dict]:
    """Launch ``nproc`` ranks for ``case``; returns one row per rank."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000), __file__, "--worker", "--case", case,
               "--experiment", args.experiment, "--layout", args.layout, "--vocab-size", str(args.vocab_size),
               "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def world_size_of(layout: str) -> int:
    """The product of the ``parallel.*`` degrees named in ``layout``."""
    size = 1
    for item in layout.split():
        key, _, value = item.partition("=")
        if key in ("parallel.dp_shard", "parallel.dp_replicate", "parallel.tp", "parallel.pp"):
            size *= int(value)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="gpt_1b")
    parser.add_argument("--layout", default="parallel.dp_shard=2", help="space-separated parallel.* overrides")
    parser.add_argument("--vocab-size", type=int, default=50304, help="GPT-2's vocabulary padded to 64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    nproc = world_size_of(args.layout)
    rows = []
    for repeat in range(args.repeats):
        for case in CASES if repeat % 2 == 0 else reversed(CASES):
            rows += [{**r, "repeat": repeat} for r in run_case(case, args, nproc)]
    print(f"{args.experiment} under {args.layout} ({nproc} ranks, gloo, CPU, {platform.processor() or 'cpu'}); "
          f"full model {rows[0]['full_model_mb']:.0f} MB in fp32 ({rows[0]['params']:,} parameters)")
    print(f"{'case':9} {'rank':>4} {'shard MB':>9} {'baseline MB':>12} {'peak MB':>8} {'peak-baseline MB':>17} "
          f"{'start-up s':>11}")
    for r in rows:
        print(f"{r['case']:9} {r['rank']:>4} {r['local_shard_mb']:>9.0f} {r['baseline_mb']:>12.0f} "
              f"{r['peak_mb']:>8.0f} {r['peak_mb'] - r['baseline_mb']:>17.0f} {r['startup_s']:>11.1f}")
    print(json.dumps({"benchmark": "init_scale", "experiment": args.experiment, "layout": args.layout,
                      "rows": rows}))


if __name__ == "__main__":
    main()
