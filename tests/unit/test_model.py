"""GPT model, materialisation, sampling and analytic accounting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from trainrun.config.schema import ModelConfig, OptimConfig
from trainrun.errors import ConfigError
from trainrun.model import (
    GPT,
    build_gpt,
    count_parameters,
    estimate_training_memory,
    flops_per_token,
    generate,
    materialize,
)
from trainrun.optim import build_adamw


def tiny(**overrides) -> ModelConfig:
    """A small config that runs in milliseconds."""
    base = dict(n_layers=2, n_heads=4, d_model=64, vocab_size=97, max_seq_len=32)
    return ModelConfig(**(base | overrides))


def meta_build(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return build_gpt(cfg)


def real_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights


GRID = list(itertools.product(("rmsnorm", "layernorm"), ("rope", "learned"), ("swiglu", "gelu"),
                              (True, False), (True, False)))


@pytest.mark.parametrize("norm,position,mlp,tie,bias", GRID)
def test_count_parameters_matches_module(norm, position, mlp, tie, bias):
    cfg = tiny(norm=norm, position=position, mlp=mlp, tie_embeddings=tie, bias=bias)
    model = meta_build(cfg)
    assert count_parameters(cfg) == real_numel(model)
    embedding_like = {"tok_embeddings.weight", "pos_embeddings.weight", "output.weight"}
    non_emb = sum(p.numel() for n, p in model.named_parameters() if n not in embedding_like)
    assert count_parameters(cfg, include_embeddings=False) == non_emb


def test_count_parameters_explicit_ffn_hidden():
    cfg = tiny(ffn_hidden=100, bias=True)
    assert count_parameters(cfg) == real_numel(meta_build(cfg))


def test_ffn_hidden_defaults():
    assert ModelConfig(d_model=128, mlp="gelu").ffn_hidden_size() == 512
    assert ModelConfig(d_model=128, mlp="swiglu").ffn_hidden_size() == 384  # 341.3 -> 384
    assert ModelConfig(d_model=2048, mlp="swiglu").ffn_hidden_size() == 5504


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_meta_build_materialize_is_finite_and_seeded(position):
    cfg = tiny(position=position)
    models = []
    for _ in range(2):
        model = meta_build(cfg)
        assert model.tok_embeddings.weight.is_meta
        torch.manual_seed(7)
        models.append(materialize(model, "cpu"))
    a, b = models
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.output.weight is a.tok_embeddings.weight  # to_empty unties; init_weights re-ties
    tokens = torch.randint(0, cfg.vocab_size, (3, 20))
    logits = a(tokens)
    assert logits.shape == (3, 20, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    if position == "rope":  # the buffer must be recomputed, not left as to_empty garbage
        direct = GPT(cfg)
        assert torch.equal(a.rope_cos, direct.rope_cos) and torch.equal(a.rope_sin, direct.rope_sin)
        assert "rope_cos" not in a.state_dict()


def test_init_weights_values():
    cfg = tiny(n_layers=8, d_model=256, n_heads=4, bias=True, norm="layernorm", tie_embeddings=False)
    torch.manual_seed(0)
    model = materialize(meta_build(cfg), "cpu")
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # 0.005
    layer = model.layers["3"]
    for w in (layer.attention.wo.weight, layer.mlp.w2.weight):
        assert w.std().item() == pytest.approx(out_std, rel=0.03)
    for w in (layer.attention.wqkv.weight, layer.mlp.w1.weight, model.output.weight):
        assert w.std().item() == pytest.approx(cfg.init_std, rel=0.03)
    assert torch.all(layer.attention.wqkv.bias == 0) and torch.all(layer.mlp.w2.bias == 0)
    assert torch.all(layer.attention_norm.weight == 1) and torch.all(model.norm.bias == 0)


PLAN_SHAPES = [
    {"tie_embeddings": True},
    {"tie_embeddings": False, "norm": "layernorm", "bias": True, "position": "learned", "mlp": "gelu"},
    {"n_kv_heads": 1, "mlp": "swiglu"},
]


@pytest.mark.parametrize("options", PLAN_SHAPES)
def test_init_plan_drawn_one_parameter_at_a_time_equals_init_weights(options):
    """The contract of initialisation parameter by parameter: filling fresh full-size tensors in plan order
    from the same seed gives exactly the weights ``init_weights`` gives the whole model."""
    cfg = tiny(**options)
    torch.manual_seed(3)
    expected = dict(materialize(meta_build(cfg), "cpu").named_parameters())
    plan = meta_build(cfg).init_plan()
    assert [spec.name for spec in plan] == list(expected)  # every parameter once, a tied one under its first name
    torch.manual_seed(3)
    for spec in plan:
        value = spec.fill(torch.empty(spec.shape, dtype=spec.dtype))
        assert torch.equal(value, expected[spec.name]), spec.name
    by_name = {spec.name: spec for spec in plan}
    assert by_name["layers.0.attention.wo.weight"].std == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    assert by_name["layers.0.attention_norm.weight"].std is None and by_name["norm.weight"].constant == 1.0


def test_a_parameter_missing_from_the_plan_is_refused_by_name():
    class WithExtra(GPT):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.gate = torch.nn.Parameter(torch.zeros(3))

    model = WithExtra(tiny())
    with pytest.raises(ValueError, match=r"not initialised \['gate'\]"):
        model.init_weights()


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_causal(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position)).eval()
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    t = 9
    changed[0, t] = (tokens[0, t] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_rejects_too_long_and_unresolved_vocab():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        GPT(tiny(vocab_size=None))


def test_flops_per_token_by_hand():
    # gelu, tied, rmsnorm, no bias: N_non_emb = L*(4d^2 + 8d^2 + 2d) + d
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=8, vocab_size=10, mlp="gelu", tie_embeddings=True, bias=False)
    n_non_emb = 2 * (4 * 64 + 2 * 8 * 32 + 2 * 8) + 8  # 1576
    assert count_parameters(cfg, include_embeddings=False) == n_non_emb
    expected = 6 * (1576 + 8 * 10) + 12 * 2 * 8 * 16  # 9936 + 3072
    assert flops_per_token(cfg, seq_len=16) == expected == 13008


def test_memory_estimate_monotone():
    cfg = tiny(n_layers=4, d_model=256, vocab_size=1000, max_seq_len=512)
    base = estimate_training_memory(cfg, micro_batch_size=8, seq_len=512)
    assert base.total == base.params + base.grads + base.optimizer_state + base.activations
    assert base.params == 4 * count_parameters(cfg) and base.optimizer_state == 2 * base.params
    sharded = estimate_training_memory(cfg, 8, 512, dp_shard=4)
    assert sharded.total < base.total and sharded.params == pytest.approx(base.params / 4, abs=1)
    assert sharded.activations == base.activations
    no_flash = dict(flash_attention=False)
    none = estimate_training_memory(cfg, 8, 512, activation_checkpointing="none", **no_flash)
    sel = estimate_training_memory(cfg, 8, 512, activation_checkpointing="selective", **no_flash)
    full = estimate_training_memory(cfg, 8, 512, activation_checkpointing="full", **no_flash)
    assert none.activations > sel.activations > full.activations
    assert estimate_training_memory(cfg, 8, 512, activation_checkpointing="full").activations < base.activations
    bf16 = estimate_training_memory(cfg, 8, 512, precision="bf16")
    assert bf16.activations < base.activations
    assert "total" in base.format()
    assert set(base.as_dict()) == {"params", "grads", "optimizer_state", "activations", "total"}
    with pytest.raises(ValueError, match="not a valid Precision"):
        estimate_training_memory(cfg, 8, 512, precision="int4")


def test_gpt_1b_accounting():
    cfg = ModelConfig(n_layers=24, d_model=2048, n_heads=16, vocab_size=50304, max_seq_len=2048)
    n = count_parameters(cfg)
    assert 1.25e9 < n < 1.40e9
    assert n == real_numel(meta_build(cfg))  # meta build allocates nothing
    flops = flops_per_token(cfg, 2048)
    assert 6 * n < flops < 6 * n * 1.2
    mem = estimate_training_memory(cfg, micro_batch_size=4, seq_len=2048, precision="bf16", dp_shard=8)
    assert 16 * n / 8 * 0.99 < mem.params + mem.grads + mem.optimizer_state < 16 * n / 8 * 1.01
    assert mem.total > 0


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny(vocab_size=64)
    model = GPT(cfg)
    opt = build_adamw(model, OptimConfig(lr=3e-3, weight_decay=0.0), "cpu")
    tokens = torch.randint(0, 64, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_generate_length_and_greedy_determinism():
    torch.manual_seed(0)
    model = GPT(tiny(max_seq_len=8)).train()
    prompt = torch.randint(0, 97, (1, 5))
    out = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_k=40,
                   generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 15) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    assert model.training  # mode restored
    # top_k=1 ignores the generator's draws: always the argmax (context crops past max_seq_len=8)
    g1 = generate(model, prompt, 10, 1.0, 1, torch.Generator().manual_seed(1))
    g2 = generate(model, prompt, 10, 1.0, 1, torch.Generator().manual_seed(2))
    greedy = generate(model, prompt, 10, 0.0, None, None)
    assert torch.equal(g1, g2) and torch.equal(g1, greedy)
    # same generator seed -> same sample
    s1 = generate(model, prompt, 10, 1.0, 0, torch.Generator().manual_seed(3))
    s2 = generate(model, prompt, 10, 1.0, 0, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)


def test_registered_in_models(monkeypatch):
    import trainrun.registry as registry

    monkeypatch.setattr(registry, "_plugins_loaded", True)  # trainrun.components may not exist yet
    assert registry.MODELS.get("gpt") is build_gpt
