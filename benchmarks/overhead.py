"""Framework overhead: trainrun's training step vs a bare hand-written PyTorch loop.

Both sides train the same model (same init), on the same batches, with the same AdamW, LR
schedule and clipping, in one process. Steps alternate in rounds (bare block, trainrun block)
so machine noise hits both; the ratio of median per-step times is the result (goal <= 1.03).

    python benchmarks/overhead.py [--steps 20] [--rounds 5] [override ...]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainrun import registry
from trainrun.config import compose_config, validate_config
from trainrun.data.sources import open_sources
from trainrun.distributed.initializers import init_single
from trainrun.model import materialize
from trainrun.optim import build_lr_scheduler
from trainrun.orchestrator import build_training_loop, resolve_vocab

DEFAULT_OVERRIDES = [
    "model.n_layers=4", "model.d_model=256", "model.n_heads=8", "data.seq_len=128",
    "train.micro_batch_size=8", "train.global_batch_size=16", "train.max_steps=100000",
    "train.log_interval=10", "train.progress_bar=false", "eval.interval=0", "checkpoint.interval=0",
    "logging.console=false", "logging.jsonl=false", "checkpoint.resume=never",
]


class BareLoop:
    """What a user would write by hand: fetch, forward, loss, backward, clip, step."""

    def __init__(self, cfg, env, batches_fn):
        torch.manual_seed(cfg.run.seed)
        with torch.device("meta"):
            self.model = registry.MODELS.get(cfg.model.name)(cfg.model)
        self.model = materialize(self.model, env.device)
        self.optimizer = registry.OPTIMIZERS.get(cfg.optim.name)(self.model, cfg.optim, env.device.type)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.next_batches, self.grad_clip, self.log_interval = batches_fn, cfg.optim.grad_clip, cfg.train.log_interval
        self.step_count = 0

    def train_step(self) -> None:
        micro_batches = self.next_batches()
        for inputs, targets in micro_batches:
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.step_count % self.log_interval == 0:
            loss.item()  # the same host sync the trainrun loop does when it logs


def time_block(step_fn, steps: int) -> list[float]:
    """Per-step wall times of ``steps`` calls."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bare/trainrun blocks")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.d_model=512")
    args = parser.parse_args()

    cfg = compose_config([*DEFAULT_OVERRIDES, *args.overrides])
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    dataset = open_sources(cfg.data)
    cfg = resolve_vocab(cfg, dataset)
    with tempfile.TemporaryDirectory() as run_dir:
        loop = build_training_loop(cfg, env, dataset, Path(run_dir))
        # The bare loop reads the very same batches, pre-fetched, so it pays no data cost at all.
        from trainrun.data import build_train_iterator

        bare_iter = build_train_iterator(dataset, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.run.seed)
        accum = loop.accum_steps
        bare = BareLoop(cfg, env, lambda: [next(bare_iter) for _ in range(accum)])

        def trainrun_step() -> None:
            result = loop.train_step()
            if loop.state.step % cfg.train.log_interval == 0:
                loop.log_step(result)

        time_block(bare.train_step, args.warmup)
        time_block(trainrun_step, args.warmup)
        bare_times, trainrun_times = [], []
        for _ in range(args.rounds):
            bare_times += time_block(bare.train_step, args.steps)
            trainrun_times += time_block(trainrun_step, args.steps)
        loop.components.metrics.close()

    bare_ms, trainrun_ms = statistics.median(bare_times) * 1e3, statistics.median(trainrun_times) * 1e3
    ratio = trainrun_ms / bare_ms
    params = sum(p.numel() for p in bare.model.parameters())
    print(f"{'loop':<10} {'median ms/step':>15} {'mean ms/step':>13}")
    print(f"{'bare':<10} {bare_ms:>15.2f} {statistics.mean(bare_times) * 1e3:>13.2f}")
    print(f"{'trainrun':<10} {trainrun_ms:>15.2f} {statistics.mean(trainrun_times) * 1e3:>13.2f}")
    print(f"ratio trainrun/bare = {ratio:.3f} (goal <= 1.03); {params:,} params, "
          f"{cfg.train.global_batch_size}x{cfg.data.seq_len} tokens/step, {args.rounds}x{args.steps} steps per side")
    print(json.dumps({
        "benchmark": "overhead", "ratio": round(ratio, 4), "bare_ms": round(bare_ms, 3),
        "trainrun_ms": round(trainrun_ms, 3), "params": params, "steps_per_side": args.rounds * args.steps,
        "device": str(env.device), "torch": torch.__version__, "goal_met": bool(math.isfinite(ratio) and ratio <= 1.03),
    }))


if __name__ == "__main__":
    main()
