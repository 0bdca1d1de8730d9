"""Step executors on CPU: eager vs torch.compile vs bf16 autocast, NaN skipping, guarded CUDA paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY
from trainrun import registry
from trainrun.config import ConfigError, compose_config, validate_config
from trainrun.distributed.initializers import init_single
from trainrun.orchestrator import build_training_loop, resolve_vocab


def _loop(tmp_path: Path, corpus: Path, *overrides: str):
    cfg = compose_config([*TINY, f"data.path={corpus}", "train.max_steps=10", "checkpoint.resume=never",
                          "logging.console=false", "logging.jsonl=false", *overrides])
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    dataset = registry.DATASETS.get(cfg.data.name)(cfg.data)
    return build_training_loop(resolve_vocab(cfg, dataset), env, dataset, tmp_path)


def _losses(tmp_path: Path, corpus: Path, *overrides: str, steps: int = 3) -> list[float]:
    loop = _loop(tmp_path, corpus, *overrides)
    try:
        return [loop.train_step().loss.item() for _ in range(steps)]
    finally:
        loop.parts.metrics.close()


def test_eager_is_deterministic(tmp_path, corpus_cache):
    assert _losses(tmp_path, corpus_cache) == _losses(tmp_path, corpus_cache)


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, corpus_cache):
    eager = _losses(tmp_path, corpus_cache)
    compiled = _losses(tmp_path, corpus_cache, "train.step_executor=compile")
    # Inductor fuses and reorders float ops: equal to fp32 rounding, not bit for bit.
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_bf16_autocast_tracks_fp32(tmp_path, corpus_cache):
    fp32 = _losses(tmp_path, corpus_cache)
    bf16 = _losses(tmp_path, corpus_cache, "train.precision=bf16")
    assert all(torch.isfinite(torch.tensor(bf16)))
    # bf16 keeps 8 mantissa bits: per-token logits differ by ~1e-2 relative, the mean loss much less.
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_nan_step_is_skipped_and_parameters_unchanged(tmp_path, corpus_cache):
    loop = _loop(tmp_path, corpus_cache, "debug.inject_nan_at_steps=[2]")
    model = loop.parts.model_parts[0]
    assert not loop.train_step().skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = loop.train_step()
    assert poisoned.skipped and not torch.isfinite(poisoned.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert loop.state.skipped_steps == 1 and loop.consecutive_skips == 1
    assert not loop.train_step().skipped and loop.consecutive_skips == 0
    loop.parts.metrics.close()


@pytest.mark.parametrize("override", ["train.step_executor=cuda_graph", "train.precision=fp16", "run.device=cuda"])
def test_cuda_only_settings_are_refused_on_cpu(override):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError):
        validate_config(compose_config([override]), world_size=1)
