"""Step executors on CPU: eager vs torch.compile vs bf16 autocast, NaN skipping, guarded CUDA paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.cli import TINY
from trainrun.config import ConfigError, compose_config, validate_config
from trainrun.data.sources import open_sources
from trainrun.distributed.initializers import init_single
from trainrun.orchestrator import build_training_loop, resolve_vocab


def _loop(tmp_path: Path, corpus: Path, *overrides: str):
    cfg = compose_config([*TINY, f"data.path={corpus}", "train.max_steps=10", "checkpoint.resume=never",
                          "logging.console=false", "logging.jsonl=false", *overrides])
    validate_config(cfg, world_size=1)
    env = init_single(cfg)
    dataset = open_sources(cfg.data)
    return build_training_loop(resolve_vocab(cfg, dataset), env, dataset, tmp_path)


def _losses(tmp_path: Path, corpus: Path, *overrides: str, steps: int = 3) -> list[float]:
    loop = _loop(tmp_path, corpus, *overrides)
    try:
        return [loop.train_step().loss.item() for _ in range(steps)]
    finally:
        loop.components.metrics.close()


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
    model = loop.components.model_parts[0]
    assert not loop.train_step().skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = loop.train_step()
    assert poisoned.skipped and not torch.isfinite(poisoned.loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert loop.state.skipped_steps == 1 and loop.skipped.consecutive == 1
    assert not loop.train_step().skipped and loop.skipped.consecutive == 0
    loop.components.metrics.close()


@pytest.mark.parametrize(("override", "says"), [
    ("train.step_executor=cuda_graph", "CUDA-graph capture needs a CUDA device"),
    ("train.precision=fp16", "fp16 needs CUDA"),
    ("train.precision=fp8", "float8 training needs a CUDA GPU"),
    ("run.device=cuda", "no CUDA device is visible"),
])
def test_cuda_only_settings_are_refused_on_cpu(override, says):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=says):
        validate_config(compose_config([override]), world_size=1)


@pytest.mark.parametrize(("overrides", "says"), [
    (["parallel.dp_replicate=2"], "one process only"),
    (["optim.implementation=foreach"], "cannot skip a non-finite step inside the graph"),
    (["debug.inject_nan_at_steps=[1]"], "decides on the host per step"),
    (["parallel.activation_checkpointing=full"], "not captured"),
    (["parallel.pp=2", "model.tie_embeddings=false"], "splits it into stages; use train.step_executor=pipeline"),
    (["train.compile.optimizer=true"], "train.compile.optimizer=True: only train.step_executor=compile reads it"),
])
def test_what_a_cuda_graph_cannot_capture_is_refused_up_front(monkeypatch, overrides, says):
    """Checked as on a GPU machine (the executor's device check passes): the refusal is about the capture."""
    from trainrun.train import executors

    monkeypatch.setattr(executors, "resolve_device_type", lambda cfg: "cuda")
    cfg = compose_config(["train.step_executor=cuda_graph", "run.device=cpu", *overrides])
    world = 2 if any(o.startswith(("parallel.dp_replicate=2", "parallel.pp=2")) for o in overrides) else 1
    with pytest.raises(ConfigError, match=says):
        validate_config(cfg, world_size=world)


@pytest.mark.parametrize(("overrides", "says"), [
    (["train.compile.scope=model"], r"train.compile.scope='model': only train.step_executor=compile reads it, "
                                    r"this run uses eager"),
    (["train.compile.optimizer=true"], "train.compile.optimizer=True: only train.step_executor=compile"),
    (["train.cuda_graph.warmup_steps=5"], "train.cuda_graph.warmup_steps=5: only train.step_executor=cuda_graph"),
    (["train.step_executor=compile", "train.cuda_graph.compile_blocks=true"], "this run uses compile"),
    (["parallel.pp=2", "model.tie_embeddings=false"],
     "train.step_executor='eager': runs the whole model in each process, but parallel.pp=2 splits it"),
    (["parallel.pp=2", "model.tie_embeddings=false", "train.step_executor=compile"],
     "use train.step_executor=pipeline"),
    (["train.step_executor=pipeline"], "parallel.pp=1 makes none"),
    (["parallel.pp=2", "model.tie_embeddings=false", "train.step_executor=pipeline", "train.compile.scope=model"],
     "this run uses pipeline"),
])
def test_each_executor_refuses_what_it_does_not_honour(overrides, says):
    """A setting of another executor, or a layout the executor cannot run, is one line at start-up, never
    ignored (train.compile.* used to be read by eager, dropped by the capture and by the pipeline) and never
    a silent swap (eager used to become the pipeline executor under parallel.pp>1)."""
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=says):
        validate_config(cfg, world_size=cfg.parallel.world_size)


def test_each_executor_accepts_its_own_settings():
    for overrides in (["train.step_executor=compile", "train.compile.scope=none", "train.compile.optimizer=true"],
                      ["parallel.pp=2", "model.tie_embeddings=false", "train.step_executor=pipeline"],
                      ["parallel=pp2_1f1b"]):
        cfg = compose_config(overrides)
        validate_config(cfg, world_size=cfg.parallel.world_size)


def test_fused_adamw_skips_on_the_device_and_the_loop_learns_at_log_intervals(tmp_path, corpus_cache):
    """optim.implementation=fused: no host sync per step. A NaN step is still never applied (the fused
    kernel masks it with found_inf), the loop counts it when it logs, rewinds the LR schedule, and
    train.max_skipped_steps still stops the run within one log interval."""
    loop = _loop(tmp_path, corpus_cache, "optim.implementation=fused", "debug.inject_nan_at_steps=[2,5,6,7]",
                 "train.log_interval=4", "train.max_skipped_steps=3")
    assert loop.components.executor.update.on_device
    model = loop.components.model_parts[0]
    first = loop.train_step()
    assert first.skipped is None and bool(first.finite)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = loop.components.executor.scheduler.last_epoch
    poisoned = loop.train_step()
    assert poisoned.skipped is None and not bool(poisoned.finite)  # the host was not asked
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # but nothing was applied
    assert loop.state.skipped_steps == 0  # not read yet
    loop.skipped.sync()
    assert loop.state.skipped_steps == 1 and loop.skipped.consecutive == 1
    assert loop.components.executor.scheduler.last_epoch == lr_before  # the skipped step does not count
    code = loop.run()  # steps 3..: 5, 6, 7 are poisoned; seen at the log of step 8
    assert code.name == "BAD_STEPS" and loop.state.step == 8 and loop.state.skipped_steps == 4
    loop.components.metrics.close()


def test_fused_and_foreach_adamw_train_alike(tmp_path, corpus_cache):
    foreach = _losses(tmp_path, corpus_cache, "optim.implementation=foreach")
    fused = _losses(tmp_path, corpus_cache, "optim.implementation=fused")
    assert fused == pytest.approx(foreach, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["train.compile.scope=model"], ["train.compile.optimizer=true"]])
def test_other_compile_settings_match_eager(tmp_path, corpus_cache, overrides):
    eager = _losses(tmp_path, corpus_cache)
    compiled = _losses(tmp_path, corpus_cache, "train.step_executor=compile", *overrides)
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_compiled_optimizer_does_not_recompile_as_the_lr_changes(tmp_path, corpus_cache):
    """A float LR is a constant to dynamo: a warm-up schedule used to recompile the optimizer step at
    every step until the recompile limit, then fall back to eager. The LR is a tensor input instead."""
    loop = _loop(tmp_path, corpus_cache, "train.step_executor=compile", "train.compile.scope=none",
                 "train.compile.optimizer=true", "optim.warmup_steps=10")
    try:
        loop.train_step()  # compiles (the optimizer state is created here)
        loop.train_step()  # may compile once more, now that the state exists
        lr = loop.components.executor.optimizer.param_groups[0]["lr"]
        assert isinstance(lr, torch.Tensor)
        with torch._dynamo.config.patch(error_on_recompile=True):
            results = [loop.train_step() for _ in range(4)]
        assert len({r.lr for r in results}) == 4  # the LR did change at every one of those steps
        assert float(lr) == pytest.approx(loop.components.executor.scheduler.get_last_lr()[0].item())
    finally:
        loop.components.metrics.close()


def test_compile_per_block_keeps_parameter_names(tmp_path, corpus_cache):
    """Blocks are compiled in place, so checkpoints of a compiled run load into an eager one and back."""
    eager = _loop(tmp_path, corpus_cache)
    compiled = _loop(tmp_path, corpus_cache, "train.step_executor=compile")
    assert list(compiled.components.model_parts[0].state_dict()) == list(eager.components.model_parts[0].state_dict())
    for loop in (eager, compiled):
        loop.components.metrics.close()
