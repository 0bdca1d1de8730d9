"""Grouped-query attention (``model.n_kv_heads``) and Llama 3.1's RoPE scaling (``model.rope_scaling``).

* Model: a GQA model is the MHA model whose k/v heads are repeated over their groups; parameter
  accounting is exact; a training step runs and learns.
* RoPE: the llama3 frequencies equal transformers' ``_compute_llama3_parameters``.
* Hugging Face: a Llama config with ``num_key_value_heads < num_attention_heads`` (2, and 1: MQA) and
  ``rope_scaling`` of type llama3 imports through ``model.init_from`` with transformers' logits, on
  sequences longer than ``original_max_position_embeddings`` (where the scaling changes the angles), and
  exports back to the same tensors and config; a transformers 4.x config (``rope_scaling`` +
  ``rope_theta``) reads the same.
* Refusals: each one line naming the field.

Tolerance: ``LOGIT_ATOL = 1e-5``, that of ``test_hf_export.py`` (same fp32 operations, logits ~1).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")

from tests.unit.test_hf_export import LOGIT_ATOL, export, load_hf, safetensors_of, save_checkpoint  # noqa: E402
from trainrun.checkpoint.resume import check_model_compatible  # noqa: E402
from trainrun.config.schema import ModelConfig, ParallelConfig, RopeScalingConfig, TrainRunConfig  # noqa: E402
from trainrun.config.validate import check_tensor_parallel  # noqa: E402
from trainrun.errors import ConfigError  # noqa: E402
from trainrun.hf.config import resolve_init_from  # noqa: E402
from trainrun.hf.import_weights import load_hf_weights  # noqa: E402
from trainrun.hf.mapping import ExportError, architecture  # noqa: E402
from trainrun.model import GPT, count_parameters, estimate_training_memory  # noqa: E402
from trainrun.model.layers import rope_cache  # noqa: E402
from trainrun.model.qkv import fuse_qkv, split_qkv  # noqa: E402

LLAMA31 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
"""Llama 3.1's scaling with a small original context, so the 96-token test sequences use scaled angles."""
SEQ = 96
MEASURED: dict[str, float] = {}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128,
                          "vocab_size": 97, **overrides})


def hf_llama(directory: Path, kv_heads: int = 2, rope: dict | None = None) -> torch.nn.Module:
    """A random transformers Llama (GQA, Llama 3.1 RoPE) built from a seed and saved with save_pretrained."""
    config = transformers.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rope_parameters=rope or LLAMA31,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model.eval()


def logit_diff(ours: torch.nn.Module, theirs, vocab: int = 257, seed: int = 1) -> float:
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (2, SEQ))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape
    return float((a - b).abs().max())


def imported(directory: Path) -> tuple[GPT, ModelConfig]:
    cfg = resolve_init_from(ModelConfig(n_layers=7, n_kv_heads=None, init_from=str(directory)))
    cfg.validate()
    model = GPT(cfg).eval()
    load_hf_weights([model], cfg)
    return model, cfg


# ---- the model ----------------------------------------------------------------------------------------


def test_gqa_is_mha_with_repeated_kv_heads():
    """Query heads 2j, 2j+1 attend with kv head j (transformers' repeat_kv grouping)."""
    torch.manual_seed(0)
    gqa = GPT(tiny()).eval()
    mha = GPT(tiny(n_kv_heads=None)).eval()
    state = gqa.state_dict()
    hs = gqa.cfg.head_dim
    for name, value in list(state.items()):
        if name.endswith("attention.wqkv.weight"):  # k, v (nkv*hs, C) -> (nh*hs, C), fused again for 4 kv heads
            q, k, v = split_qkv(value, 4, 2)
            k, v = (t.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(4 * hs, -1) for t in (k, v))
            state[name] = fuse_qkv(q, k, v, 4)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.allclose(gqa(ids), mha(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_count_parameters_is_exact(kv, bias):
    cfg = tiny(n_kv_heads=kv, bias=bias, tie_embeddings=False)
    model = GPT(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    assert model.layers["0"].attention.wqkv.weight.shape == ((cfg.n_heads + 2 * kv) * cfg.head_dim, cfg.d_model)


def test_memory_estimate_shrinks_with_fewer_kv_heads():
    est = [estimate_training_memory(tiny(n_kv_heads=kv), 4, 128).activations for kv in (4, 2, 1)]
    assert est[0] > est[1] > est[2]


def test_gqa_training_step_learns():
    torch.manual_seed(0)
    cfg = tiny(n_kv_heads=1, rope_scaling=RopeScalingConfig(type="llama3", original_max_position_embeddings=16))
    cfg.validate()
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 33))
    losses = []
    for _ in range(10):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_llama3_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=256,
                                      rope_parameters={**LLAMA31, "rope_theta": 500000.0})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = RopeScalingConfig(type="llama3", original_max_position_embeddings=32)
    cos, sin = rope_cache(64, 256, 500000.0, scaling=scaling)
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), theirs)
    emb = torch.cat((freqs, freqs), dim=-1)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())
    plain, _ = rope_cache(64, 256, 500000.0)
    assert not torch.allclose(plain, cos, atol=1e-3)  # the scaling does change the angles at this length


# ---- Hugging Face: import and export --------------------------------------------------------------------


@pytest.mark.parametrize("kv", [2, 1])
def test_init_from_gqa_llama31_and_export_back(kv, tmp_path):
    hf_model = hf_llama(tmp_path / "hf", kv_heads=kv)
    model, cfg = imported(tmp_path / "hf")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len) == (2, 4, kv, 256)
    assert cfg.rope_scaling == RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=32)
    diff = logit_diff(model, hf_model)
    MEASURED[f"import kv={kv}"] = diff
    print(f"import kv={kv}: max |logit diff| = {diff:.3g}")
    assert diff < LOGIT_ATOL
    # Without the scaling the same weights give other logits: the test sequences reach scaled angles.
    unscaled = GPT(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())).eval()
    load_hf_weights([unscaled], cfg)
    assert logit_diff(unscaled, hf_model) > 1e-3

    save_checkpoint(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "out")
    original, exported = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "out")
    assert original.keys() == exported.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_key_value_heads"] == kv
    assert config["rope_parameters"] == LLAMA31
    assert config["rope_scaling"] == {k: v for k, v in LLAMA31.items() if k != "rope_theta"}
    reloaded = load_hf(tmp_path / "out")
    assert reloaded.config.num_key_value_heads == kv
    diff = logit_diff(model, reloaded)
    MEASURED[f"export kv={kv}"] = diff
    print(f"export kv={kv}: max |logit diff| = {diff:.3g}")
    assert diff < LOGIT_ATOL
    again, again_cfg = imported(tmp_path / "out")
    assert (again_cfg.n_kv_heads, again_cfg.rope_scaling) == (cfg.n_kv_heads, cfg.rope_scaling)


def test_orchestrator_builds_and_loads_a_gqa_checkpoint(tmp_path):
    """The run's own build path (meta device, allocate, load; no random init) with model.init_from."""
    from trainrun.distributed.env import DistEnv
    from trainrun.orchestrator import build_model_and_optimizer

    hf_model = hf_llama(tmp_path / "hf", kv_heads=1)
    cfg = TrainRunConfig(model=resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf"))))
    built = build_model_and_optimizer(cfg, DistEnv(0, 0, 1, torch.device("cpu"), None, "single"))
    assert logit_diff(built.model_parts[0].eval(), hf_model) < LOGIT_ATOL


def test_transformers_4_config_reads_the_same(tmp_path):
    """transformers 4.x wrote ``rope_theta`` and ``rope_scaling`` instead of ``rope_parameters``."""
    hf_model = hf_llama(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = LLAMA31["rope_theta"]
    config["rope_scaling"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32, "rope_type": "llama3"}
    path.write_text(json.dumps(config))
    model, cfg = imported(tmp_path / "hf")
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_theta == 10000.0
    assert logit_diff(model, hf_model) < LOGIT_ATOL


def test_mha_checkpoint_imports_with_null_kv_heads(tmp_path):
    hf_model = hf_llama(tmp_path / "hf", kv_heads=4, rope={"rope_type": "default", "rope_theta": 20000.0})
    model, cfg = imported(tmp_path / "hf")
    assert cfg.n_kv_heads is None and cfg.rope_scaling == RopeScalingConfig()
    assert logit_diff(model, hf_model) < LOGIT_ATOL


@pytest.mark.parametrize(("edit", "needle"), [
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
])
def test_init_from_refuses_what_does_not_map(edit, needle, tmp_path):
    hf_llama(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ConfigError, match="model.init_from") as err:
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf")))
    assert needle in str(err.value) and "\n" not in str(err.value)


# ---- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "field"), [
    ({"n_kv_heads": 3}, "model.n_kv_heads"),
    ({"n_kv_heads": 0}, "model.n_kv_heads"),
    ({"rope_scaling": RopeScalingConfig(type="llama3", low_freq_factor=4.0, high_freq_factor=1.0)},
     "model.rope_scaling.high_freq_factor"),
    ({"rope_scaling": RopeScalingConfig(type="llama3", factor=0.0)}, "model.rope_scaling.factor"),
    ({"rope_scaling": RopeScalingConfig(type="llama3"), "position": "learned"}, "model.rope_scaling.type"),
])
def test_model_refusals(overrides, field):
    with pytest.raises(ConfigError) as err:
        tiny(**overrides).validate()
    assert err.value.field == field and "\n" not in str(err.value)


def test_tp_must_divide_kv_heads():
    cfg = TrainRunConfig(model=tiny(n_kv_heads=1), parallel=ParallelConfig(tp=2))
    cfg.data.seq_len = 16
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(cfg)
    assert err.value.field == "parallel.tp" and "model.n_kv_heads=1" in str(err.value)
    check_tensor_parallel(TrainRunConfig(model=tiny(n_kv_heads=2), parallel=ParallelConfig(tp=2)))


def test_gpt2_layout_refuses_gqa_export():
    with pytest.raises(ExportError, match="n_kv_heads=2"):
        architecture(tiny(position="learned", mlp="gelu", norm="layernorm"))


def test_resume_compares_resolved_kv_heads(tmp_path):
    saved = dataclasses.asdict(tiny(n_kv_heads=None))
    check_model_compatible(saved, tiny(n_kv_heads=4), tmp_path)  # null and n_heads: the same model
    check_model_compatible({k: v for k, v in saved.items() if k != "n_kv_heads"}, tiny(n_kv_heads=None), tmp_path)
    with pytest.raises(ConfigError, match="model.n_kv_heads"):
        check_model_compatible(saved, tiny(n_kv_heads=2), tmp_path)
