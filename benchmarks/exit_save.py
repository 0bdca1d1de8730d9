"""Exit save: how long the blocking save after a stop signal takes, against the launcher's grace period.

Builds ``gpt_125m`` (124M parameters) on CPU with AdamW state, then times the exit save through
``Checkpointer.save(exit_save=True)`` (the loop's own path: DCP write, fsync, manifest, rename) with
``checkpoint.exit_verify=sha256`` and ``=size``, side by side, ``--repeats`` times each. ``gpt_1b``
does not fit this machine's memory with its optimizer state (about 21 GB), so its time is scaled from
the measured bytes per second by the ratio of checkpoint sizes (parameters counted on the meta device).

    python benchmarks/exit_save.py [--repeats 3] [--dir /tmp/x]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config import compose_config
from trainrun.model import count_parameters
from trainrun.model.loss import lm_loss
from trainrun.state import TrainState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_save import NoData, build_cpu_model_and_optimizer  # noqa: E402 - sibling benchmark module

GRACE_S = {"torchrun (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)": 30, "Slurm KillWait (default)": 30,
           "submitit_slurm signal_delay_s": 120, "torchrun.sbatch --signal=TERM@120": 120}


def _count_parameters(preset: str) -> int:
    return count_parameters(compose_config([f"model={preset}", "model.vocab_size=50304"]).model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint dir (default: a temp dir)")
    args = parser.parse_args()

    cfg = compose_config(["model=gpt_125m", "model.vocab_size=50304", "data.seq_len=64"])
    model, optimizer, scheduler = build_cpu_model_and_optimizer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len))
    lm_loss(model, x, x.roll(-1, 1)).backward()
    optimizer.step()  # AdamW moments exist from here on

    root = args.dir or Path(tempfile.mkdtemp(prefix="trainrun-exit-save-"))
    state = TrainState(step=1)
    times: dict[str, list[float]] = {"sha256": [], "size": []}
    size_bytes = 0
    checkpointers = {}
    for verify in times:
        cfg_v = compose_config(["model=gpt_125m", "model.vocab_size=50304", "data.seq_len=64",
                                f"checkpoint.exit_verify={verify}"])
        store = CheckpointStore(root / verify, 1, True, lambda: None, cfg_v.checkpoint.verify)
        checkpointers[verify] = Checkpointer(cfg_v, store, [model], [optimizer], scheduler, NoData(), state,
                                             torch.device("cpu"))
    try:
        for _ in range(args.repeats):  # interleaved, so both see the same disk and page-cache weather
            for verify, ckpt in checkpointers.items():
                state.step += 1
                start = time.perf_counter()
                path = ckpt.save(blocking=True, exit_save=True)
                times[verify].append(time.perf_counter() - start)
                size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                print(f"exit_verify={verify}: {times[verify][-1]:.2f}s", flush=True)
    finally:
        for ckpt in checkpointers.values():
            ckpt.close()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    params_1b = _count_parameters("gpt_1b")
    scale = params_1b / n_params
    median = {v: statistics.median(t) for v, t in times.items()}
    print(f"\ncheckpoint of gpt_125m: {n_params / 1e6:.1f}M parameters, {size_bytes / 1e9:.2f} GB "
          f"(weights + AdamW moments, fp32); gpt_1b: {params_1b / 1e9:.2f}B parameters, x{scale:.1f}")
    print(f"{'exit_verify':<12} {'gpt_125m (s)':>13} {'GB/s':>6} {'gpt_1b scaled (s)':>18}")
    for verify, t in median.items():
        print(f"{verify:<12} {t:>13.2f} {size_bytes / 1e9 / t:>6.2f} {t * scale:>18.1f}")
    print("grace periods: " + ", ".join(f"{k} {v}s" for k, v in GRACE_S.items()))
    print(json.dumps({"benchmark": "exit_save", "parameters": n_params, "checkpoint_bytes": size_bytes,
                      "parameters_gpt_1b": params_1b, "repeats": args.repeats, "median_s": median,
                      "gpt_1b_scaled_s": {v: t * scale for v, t in median.items()}, "runs": times,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
