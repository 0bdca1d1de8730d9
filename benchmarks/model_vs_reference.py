"""trainrun's GPT vs a minimal reference GPT at the same shape: forward + backward + AdamW step.

The reference is written here (a compact nanoGPT-style model: one fused q/k/v projection,
LayerNorm, learned positions, GELU, tied embeddings, SDPA), not imported. trainrun's model is
built with the same options (``norm=layernorm position=learned mlp=gelu tie_embeddings=true``).
Both train on the same random batches with the same AdamW (foreach); steps alternate in rounds so
noise hits both. Reported: the ratio of median step times, eager vs eager and each side with
``torch.compile`` of the whole model (the models alone), then each side's best executor: the
reference as a minimal trainer runs it (compiled model, global-norm clipping, AdamW foreach or fused,
whichever is faster here) against trainrun's own ``compile`` step executor from the registry (the
whole model compiled, clipping, the finite check, the LR schedule, and the optimizer step either
fused or compiled, whichever is faster here).

On CUDA trainrun's side also runs its ``cuda_graph`` executor (the whole step as one graph), and the
reference its fused AdamW, as a minimal GPU trainer would.

    python benchmarks/model_vs_reference.py [--device cpu|cuda] [--steps 20] [--rounds 5] [--no-compile]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from trainrun import registry
from trainrun.config import compose_config, validate_config
from trainrun.distributed.initializers import init_single
from trainrun.model import materialize
from trainrun.orchestrator import build_model_and_optimizer

SHAPE = {"n_layers": 4, "d_model": 128, "n_heads": 4, "seq_len": 64, "batch": 12, "vocab": 257}


class ReferenceBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, heads: int, layers: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(ReferenceBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def trainrun_overrides() -> list[str]:
    """trainrun's config for the reference's shape and options."""
    s = SHAPE
    return [f"model.n_layers={s['n_layers']}", f"model.d_model={s['d_model']}", f"model.n_heads={s['n_heads']}",
            f"model.vocab_size={s['vocab']}", f"model.max_seq_len={s['seq_len']}", "model.norm=layernorm",
            "model.position=learned", "model.mlp=gelu", "model.tie_embeddings=true", "model.bias=true",
            "model.dropout=0.0", f"data.seq_len={s['seq_len']}", f"train.micro_batch_size={s['batch']}",
            f"train.global_batch_size={s['batch']}", "optim.lr=1e-4"]


def trainrun_gpt(device: str) -> nn.Module:
    cfg = compose_config(trainrun_overrides())
    with torch.device("meta"):
        model = registry.MODELS.get(cfg.model.name)(cfg.model)
    return materialize(model, torch.device(device))


def make_step(model: nn.Module, compiled: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())

    loss_fn = torch.compile(loss_fn) if compiled else loss_fn

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference_trainer_step(implementation: str, device: str):
    """A minimal trainer's best step on a fresh reference model: compiled model, clipping, AdamW."""
    s = SHAPE
    model = ReferenceGPT(s["vocab"], s["seq_len"], s["d_model"], s["n_heads"], s["n_layers"]).to(device)
    fused = implementation == "fused"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    compiled = torch.compile(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(compiled(x).float().flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainrun_executor_step(device: str, *overrides: str):
    """One step of a trainrun step executor from the registry (``overrides`` pick it) on a freshly built model."""
    cfg = compose_config([*trainrun_overrides(), f"run.device={device}", *overrides])
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    built = build_model_and_optimizer(cfg, env)
    executor = registry.STEP_EXECUTORS.get(cfg.train.step_executor)(
        built.model_parts[0], built.optimizers[0], built.scheduler, cfg, env.device)
    return lambda x, y: executor.step([(x, y)])


COMPILED_MODEL = ["train.step_executor=compile", "train.compile.scope=model"]


def best_executors(device: str) -> dict:
    """Each side's candidates for its best step on ``device`` (builders; the fastest of each side counts)."""
    candidates = {
        "reference_foreach": lambda: reference_trainer_step("foreach", device),
        "reference_fused": lambda: reference_trainer_step("fused", device),
        "trainrun_fused": lambda: trainrun_executor_step(device, *COMPILED_MODEL, "optim.implementation=fused"),
        "trainrun_compiled_optimizer": lambda: trainrun_executor_step(
            device, *COMPILED_MODEL, "optim.implementation=foreach", "train.compile.optimizer=true"),
    }
    if device == "cuda":  # the whole step as one graph: forward, backward, clipping, fused AdamW
        candidates["trainrun_cuda_graph"] = lambda: trainrun_executor_step(
            device, "train.step_executor=cuda_graph", "optim.implementation=fused")
    return candidates


def measure(steps_by_name: dict, batches: list, steps: int, rounds: int, device: str) -> dict[str, float]:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for step in steps_by_name.values():  # warm-up: compilation, and the CUDA graph's warm-up and capture
        for x, y in batches[:5]:
            step(x, y)
    samples: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            sync()
            start = time.perf_counter()
            for i in range(steps):
                step(*batches[i % len(batches)])
            sync()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    s, device = SHAPE, args.device
    torch.manual_seed(0)
    batches = [(torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), device=device),
                torch.randint(0, s["vocab"], (s["batch"], s["seq_len"]), device=device)) for _ in range(8)]
    ref = ReferenceGPT(s["vocab"], s["seq_len"], s["d_model"], s["n_heads"], s["n_layers"]).to(device)
    ours = trainrun_gpt(device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("reference", ref), ("trainrun", ours))}
    modes = {"eager": False} if args.no_compile else {"eager": False, "compile": True}
    results = {}
    for mode, compiled in modes.items():
        times = measure({"reference": make_step(ref, compiled), "trainrun": make_step(ours, compiled)},
                        batches, args.steps, args.rounds, device)
        results[mode] = {**{f"{k}_ms": v * 1e3 for k, v in times.items()},
                         "ratio_trainrun_over_reference": times["trainrun"] / times["reference"]}
    if not args.no_compile:
        times = measure({name: make() for name, make in best_executors(device).items()}, batches, args.steps,
                        args.rounds, device)
        best = {side: min((t, name) for name, t in times.items() if name.startswith(side))
                for side in ("reference", "trainrun")}
        results["best_executor"] = {"reference_ms": best["reference"][0] * 1e3,
                                    "trainrun_ms": best["trainrun"][0] * 1e3,
                                    "reference_variant": best["reference"][1], "trainrun_variant": best["trainrun"][1],
                                    "ratio_trainrun_over_reference": best["trainrun"][0] / best["reference"][0],
                                    "all_ms": {name: t * 1e3 for name, t in times.items()}}
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"shape {s}, parameters {params}, {where}, {args.rounds} rounds x "
          f"{args.steps} steps (median)")
    print(f"{'mode':<14} {'reference ms':>13} {'trainrun ms':>12} {'ratio':>6}")
    for mode, r in results.items():
        print(f"{mode:<14} {r['reference_ms']:>13.2f} {r['trainrun_ms']:>12.2f} "
              f"{r['ratio_trainrun_over_reference']:>6.3f}")
    if "best_executor" in results:
        print("best executor, every variant (ms/step): " + ", ".join(
            f"{name} {ms:.2f}" for name, ms in results["best_executor"]["all_ms"].items()))
    print(json.dumps({"benchmark": "model_vs_reference", "device": where, "shape": s, "parameters": params,
                      "results": results}))


if __name__ == "__main__":
    main()
