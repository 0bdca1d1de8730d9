"""Checkpoint save: how long the training loop is blocked, async vs sync, for a >= 100M-parameter GPT on CPU.

Builds trainrun's GPT (``model=gpt_125m`` by default: 124M parameters), runs one AdamW step so
the optimizer state exists, then alternates sync and async saves through ``Checkpointer.save``
(the loop's own code path, manifest hashing included). For each save:

* sync:  blocked = the ``save()`` call (write + fsync + sha256 manifest + rename); commit = same.
* async: blocked = the ``save()`` call + the wait for staging before the next optimizer step
  (after one real forward/backward, as in the loop) + the ``finalize()`` call that commits;
  commit = wall time from the save call until the checkpoint is committed.

    python benchmarks/checkpoint_save.py [--repeats 3] [--dir /tmp/x] [override ...]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config import compose_config
from trainrun.distributed.initializers import init_single
from trainrun.model.loss import lm_loss
from trainrun.orchestrator import build_model_and_optimizer
from trainrun.state import TrainState

DEFAULT_OVERRIDES = ["model=gpt_125m", "data.seq_len=128"]


class NoData:
    """A data position with nothing in it: these benchmarks feed random batches."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


def build_cpu_model_and_optimizer(cfg):
    """trainrun's own model, optimizer and LR schedule for ``cfg`` in this process (seeded as a run is)."""
    built = build_model_and_optimizer(cfg, init_single(cfg))
    return built.model_parts[0], built.optimizers[0], built.scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint dir (default: a temp dir)")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch of the forward/backward between saves")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: model=gpt_125m)")
    args = parser.parse_args()

    cfg = compose_config([*DEFAULT_OVERRIDES, *args.overrides])
    model, optimizer, scheduler = build_cpu_model_and_optimizer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    seq, vocab = cfg.data.seq_len, cfg.model.vocab_size

    def train_step() -> float:
        start = time.perf_counter()
        x = torch.randint(0, vocab, (args.batch, seq))
        lm_loss(model, x, x.roll(-1, 1)).backward()
        return time.perf_counter() - start

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    train_step()
    optimizer_step()  # AdamW moments exist from here on

    root = args.dir or Path(tempfile.mkdtemp(prefix="trainrun-ckpt-bench-"))
    state = TrainState(step=1)
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    checkpointers = {}
    for mode in ("sync", "async"):
        store = CheckpointStore(root / mode, 1, True, lambda: None, cfg.checkpoint.verify)
        checkpointers[mode] = Checkpointer(cfg, store, [model], [optimizer], scheduler, NoData(), state,
                                           torch.device("cpu"))
    try:
        for repeat in range(args.repeats):
            for mode in ("sync", "async"):
                state.step += 1
                ckpt = checkpointers[mode]
                if mode == "sync":
                    start = time.perf_counter()
                    ckpt.save(blocking=True)
                    took = time.perf_counter() - start
                    train_step()
                    optimizer_step()
                    results[mode].append({"blocked_s": took, "commit_s": took})
                    continue
                start = time.perf_counter()
                ckpt.save(blocking=False)
                call = time.perf_counter() - start
                compute = train_step()  # forward/backward overlaps staging and writing
                wait_start = time.perf_counter()
                ckpt.wait_for_staging()  # the loop's before_update hook
                staging_wait = time.perf_counter() - wait_start
                optimizer_step()
                finalize_blocked = 0.0
                while ckpt.pending:  # the loop polls finalize(blocking=False) once per step
                    t = time.perf_counter()
                    ckpt.finalize(blocking=False)
                    finalize_blocked += time.perf_counter() - t
                    time.sleep(0.005)
                commit = time.perf_counter() - start
                results[mode].append({"blocked_s": call + staging_wait + finalize_blocked, "commit_s": commit,
                                      "call_s": call, "staging_wait_s": staging_wait, "overlapped_compute_s": compute})
                print(f"repeat {repeat}: sync blocked {results['sync'][-1]['blocked_s']:.3f}s | async blocked "
                      f"{results['async'][-1]['blocked_s']:.3f}s (call {call:.3f}, staging wait {staging_wait:.3f}, "
                      f"commit {finalize_blocked:.3f}), committed after {commit:.3f}s", flush=True)
    finally:
        for ckpt in checkpointers.values():
            ckpt.close()
        size = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    summary = {mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for mode, rows in results.items()}
    print(f"\nparameters: {n_params / 1e6:.1f}M  checkpoint: {size / 1e9:.2f} GB  verify: {cfg.checkpoint.verify}  "
          f"torch threads: {torch.get_num_threads()}  repeats: {args.repeats} (median)")
    print(f"{'mode':<6} {'loop blocked (s)':>17} {'time to commit (s)':>19}")
    for mode in ("sync", "async"):
        print(f"{mode:<6} {summary[mode]['blocked_s']:>17.3f} {summary[mode]['commit_s']:>19.3f}")
    print(json.dumps({"benchmark": "checkpoint_save", "parameters": n_params, "checkpoint_bytes": size,
                      "verify": cfg.checkpoint.verify, "repeats": args.repeats, "median": summary,
                      "runs": results}))


if __name__ == "__main__":
    main()
