"""CUDA-graph and GPU-only paths; skipped without CUDA (run them where a GPU is lent: see docs/benchmarks.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import TINY, read_metrics, run_cli
from trainrun.config import compose_config, validate_config
from trainrun.data.sources import open_sources
from trainrun.distributed.initializers import init_single
from trainrun.orchestrator import build_training_loop, resolve_vocab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GRAPH = ["train.step_executor=cuda_graph", "train.cuda_graph.warmup_steps=3"]


def _loop(tmp_path: Path, corpus: Path, *overrides: str):
    cfg = compose_config([*TINY, f"data.path={corpus}", "run.device=cuda", "train.max_steps=40",
                          "checkpoint.resume=never", "logging.console=false", "logging.jsonl=false",
                          "train.micro_batch_size=4", "train.global_batch_size=8", *overrides])  # accumulation 2
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    dataset = open_sources(cfg.data)
    return build_training_loop(resolve_vocab(cfg, dataset), env, dataset, tmp_path)


def _losses(tmp_path: Path, corpus: Path, *overrides: str, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    loop = _loop(tmp_path, corpus, *overrides)
    try:
        return [float(loop.train_step().loss) for _ in range(steps)]
    finally:
        loop.components.executor.close()
        loop.components.metrics.close()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_matches_eager(tmp_path, corpus_cache, precision):
    eager = _losses(tmp_path / "eager", corpus_cache, f"train.precision={precision}", "optim.implementation=fused")
    graph = _losses(tmp_path / "graph", corpus_cache, f"train.precision={precision}", *GRAPH)
    # Same kernels replayed, but cuBLAS may pick other algorithms inside a capture: equal to rounding.
    assert graph == pytest.approx(eager, rel=1e-4 if precision == "fp32" else 2e-2)


def test_a_nan_step_inside_the_graph_is_skipped(tmp_path, corpus_cache):
    loop = _loop(tmp_path, corpus_cache, *GRAPH)
    for _ in range(5):  # warm-up, capture, replays
        loop.train_step()
    assert loop.components.executor.graph is not None
    model = loop.components.model_parts[0]
    norm_weight = model.norm.weight
    saved = norm_weight.detach().clone()
    norm_weight.data.fill_(math.inf)  # in place: the captured graph reads this tensor
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm.")}
    result = loop.train_step()
    assert not bool(result.finite)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    norm_weight.data.copy_(saved)
    assert bool(loop.train_step().finite)
    loop.sync_skips()
    assert loop.state.skipped_steps == 1
    loop.components.executor.close()
    loop.components.metrics.close()


def test_cuda_graph_run_resumes(tmp_path, corpus_cache):
    common = [*TINY, f"data.path={corpus_cache}", "run.device=cuda", "train.max_steps=20", "train.log_interval=1",
              "eval.interval=0", "checkpoint.interval=0", "eval.sample_tokens=0", *GRAPH]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli([*common, f"hydra.run.dir={straight}"], cwd=tmp_path).returncode == 0
    assert run_cli([*common, "train.exit_interval=10", f"hydra.run.dir={split}"], cwd=tmp_path).returncode == 3
    assert run_cli([*common, f"hydra.run.dir={split}"], cwd=tmp_path).returncode == 0
    got = {r["step"]: r["loss"] for r in read_metrics(split) if "loss" in r}
    expected = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(1, 21)] == pytest.approx([expected[s] for s in range(1, 21)], rel=1e-4)


def test_timers_use_cuda_events_and_mfu_uses_the_gpu_table(tmp_path, corpus_cache):
    loop = _loop(tmp_path, corpus_cache, "train.precision=bf16")
    for _ in range(3):
        loop.train_step()
    times = loop.timers.as_dict(steps=3)
    assert times["time_step"] > 0 and type(loop.timers("step")).__name__ == "CudaEventTimer"
    assert loop.peak_flops > 1e13  # a table entry or the documented unknown-GPU fallback, not the CPU's 1e12
    loop.components.metrics.close()


def test_compiled_optimizer_on_cuda_matches_eager_without_recompiling(tmp_path, corpus_cache):
    """The fused CUDA AdamW, compiled, with its LR in a tensor that the warm-up schedule changes every step."""
    eager = _losses(tmp_path / "eager", corpus_cache, "optim.implementation=fused", steps=8)
    torch.manual_seed(0)  # as _losses does: the same initial weights
    loop = _loop(tmp_path / "compiled", corpus_cache, "optim.implementation=fused", "train.step_executor=compile",
                 "train.compile.scope=none", "train.compile.optimizer=true")
    try:
        compiled = [float(loop.train_step().loss) for _ in range(2)]  # compiles (then once more, with state)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled += [float(loop.train_step().loss) for _ in range(6)]
    finally:
        loop.components.executor.close()
        loop.components.metrics.close()
    assert compiled == pytest.approx(eager, rel=1e-4)
