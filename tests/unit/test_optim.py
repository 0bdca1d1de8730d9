"""AdamW parameter groups, LR schedules and optimizer-config validation."""

from __future__ import annotations

import math

import pytest
import torch

from trainrun.config.schema import ModelConfig, OptimConfig
from trainrun.errors import ConfigError
from trainrun.model import GPT
from trainrun.optim import (
    build_adamw,
    build_lr_scheduler,
    constant_schedule,
    cosine_schedule,
    linear_schedule,
    param_group_summary,
    wsd_schedule,
    wsd_sqrt_schedule,
)


@pytest.fixture(autouse=True)
def _no_plugin_import(monkeypatch):
    """``Registry.get`` imports trainrun.components, which another part of the project provides."""
    import trainrun.registry as registry

    monkeypatch.setattr(registry, "_plugins_loaded", True)


def model(**kw) -> GPT:
    base = dict(n_layers=2, n_heads=2, d_model=32, vocab_size=50, max_seq_len=16, norm="layernorm", bias=True)
    return GPT(ModelConfig(**(base | kw)))


def test_decay_groups_split_by_ndim():
    m = model()
    opt = build_adamw(m, OptimConfig(weight_decay=0.1), "cpu")
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "layers.0.attention.wqkv.weight" in decay and "tok_embeddings.weight" in decay
    assert "norm.weight" in no_decay and "norm.bias" in no_decay
    assert "layers.1.attention_norm.weight" in no_decay and "layers.0.mlp.w2.bias" in no_decay
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    # tied output weight appears exactly once
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    assert "decay:" in param_group_summary(opt) and "no_decay:" in param_group_summary(opt)


@pytest.mark.parametrize(
    "implementation,device_type,fused,foreach",
    [
        ("auto", "cpu", False, True),
        ("auto", "cuda", True, False),
        ("for_loop", "cpu", False, False),
        ("foreach", "cuda", False, True),
        ("fused", "cpu", True, False),
    ],
)
def test_implementation(implementation, device_type, fused, foreach, monkeypatch):
    captured = {}

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kw):
            captured.update(kw)
            kw.update(fused=False, foreach=False)  # build on CPU whatever was asked
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    build_adamw(model(), OptimConfig(implementation=implementation), device_type)
    assert captured["fused"] is fused and captured["foreach"] is foreach


def test_adamw_steps_with_lr():
    m = model()
    opt = build_adamw(m, OptimConfig(lr=0.5, beta1=0.8, beta2=0.9, eps=1e-6), "cpu")
    assert all(g["lr"] == 0.5 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in opt.param_groups)
    with pytest.raises(ConfigError, match="optim.implementation"):
        build_adamw(m, OptimConfig(implementation="turbo"), "cpu")


CFG = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
MAX = 110  # decay over 100 steps: mid-decay at step 60


def test_warmup_shared_by_all():
    for factory in (constant_schedule, cosine_schedule, linear_schedule, wsd_schedule, wsd_sqrt_schedule):
        f = factory(OptimConfig(**CFG), MAX)
        assert f(0) == pytest.approx(1 / 11)  # non-zero first step
        assert f(5) == pytest.approx(6 / 11)
        assert f(9) < f(10) == pytest.approx(1.0)


def test_constant():
    f = constant_schedule(OptimConfig(**CFG), MAX)
    assert [f(s) for s in (10, 60, 110, 500)] == [1.0, 1.0, 1.0, 1.0]


def test_cosine():
    f = cosine_schedule(OptimConfig(**CFG), MAX)
    assert f(60) == pytest.approx(0.55)  # halfway: min + (1 - min)/2
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)


def test_linear():
    f = linear_schedule(OptimConfig(**CFG), MAX)
    assert f(60) == pytest.approx(0.55) and f(35) == pytest.approx(1 - 0.9 * 0.25)
    assert f(110) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)


def test_explicit_decay_steps():
    f = linear_schedule(OptimConfig(**CFG, decay_steps=20), MAX)
    assert f(20) == pytest.approx(0.55) and f(30) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_wsd_plateau_then_decay():
    f = wsd_schedule(OptimConfig(**CFG, wsd_decay_fraction=0.2), MAX)  # decay over steps 90..110
    assert all(f(s) == 1.0 for s in range(10, 91))
    assert f(100) == pytest.approx(0.55)
    assert f(95) == pytest.approx(1 - 0.9 * 0.25)
    assert f(110) == pytest.approx(0.1) and f(300) == pytest.approx(0.1)
    g = wsd_sqrt_schedule(OptimConfig(**CFG, wsd_decay_fraction=0.2), MAX)
    assert g(90) == 1.0 and g(95) == pytest.approx(1 - 0.9 * 0.5) and g(110) == pytest.approx(0.1)


def test_no_warmup_starts_at_peak():
    f = cosine_schedule(OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0), 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_build_lr_scheduler_drives_optimizer():
    m = model()
    cfg = OptimConfig(lr=0.01, warmup_steps=4, schedule="linear", min_lr_ratio=0.0)
    opt = build_adamw(m, cfg, "cpu")
    sched = build_lr_scheduler(opt, cfg, max_steps=8)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.01 / 5) and seen[4] == pytest.approx(0.01)
    assert seen[6] == pytest.approx(0.005) and seen[8] == pytest.approx(0.0)
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)


@pytest.mark.parametrize(
    "overrides,max_steps,field",
    [
        (dict(warmup_steps=-1), 100, "optim.warmup_steps"),
        (dict(min_lr_ratio=-0.1), 100, "optim.min_lr_ratio"),
        (dict(min_lr_ratio=1.5), 100, "optim.min_lr_ratio"),
        (dict(decay_steps=0), 100, "optim.decay_steps"),
        (dict(wsd_decay_fraction=1.2), 100, "optim.wsd_decay_fraction"),
        (dict(lr=0.0), 100, "optim.lr"),
        (dict(beta2=1.0), 100, "optim.beta2"),
    ],
)
def test_validate_errors(overrides, max_steps, field):
    with pytest.raises(ConfigError) as err:
        OptimConfig(**overrides).validate()
    assert err.value.field == field


def test_bad_implementation_is_refused_when_built():
    with pytest.raises(ConfigError, match="optim.implementation='turbo': use one of auto, fused, foreach, for_loop"):
        OptimConfig(implementation="turbo")


def test_validate_accepts_defaults_and_edge_values():
    OptimConfig().validate()
    OptimConfig(warmup_steps=100, min_lr_ratio=1.0).validate()
    f = cosine_schedule(OptimConfig(warmup_steps=100, min_lr_ratio=0.0), 100)
    assert f(99) == pytest.approx(100 / 101) and f(100) == 0.0  # no decay window: straight to the floor


def test_unknown_schedule_lists_registered():
    from trainrun.registry import UnknownComponentError

    m = model()
    cfg = OptimConfig(schedule="triangle")
    with pytest.raises(UnknownComponentError, match="cosine"):
        build_lr_scheduler(build_adamw(m, cfg, "cpu"), cfg, 100)
