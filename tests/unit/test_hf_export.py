"""Hugging Face interoperability, checked against transformers itself, offline.

* Export: every exportable combination (tied or not, with or without biases, a padded vocabulary,
  sharded safetensors) loads with ``AutoModelForCausalLM`` and gives trainrun's logits and greedy tokens.
* Import: ``model.init_from`` of Llama and GPT-2 models built from a config and saved with
  ``save_pretrained`` gives transformers' logits; export -> import -> export gives identical tensors.
* Refusals: combinations without an equivalent, broken checkpoints and directories, vocabulary
  mismatches: each one line and exit status 2.
* Tokenizers: ``trainrun-prepare --tokenizer tokenizer.json``, and the exported tokenizer decodes
  what the exported model generates.

Tolerance: trainrun and transformers compute the same fp32 operations (transformers' RMSNorm
upcasts, which is a no-op in fp32; its RoPE tables are computed by a matmul instead of an outer
product), so logits agree to ~1e-6; ``LOGIT_ATOL = 1e-5`` on logits of magnitude ~1 catches any
mis-mapped tensor (a swapped norm or a transposed projection moves them by >1e-2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

# transformers and huggingface_hub read these when first imported: nothing here may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tests.helpers.cli import TINY, run_cli  # noqa: E402
from trainrun.checkpoint.store import CheckpointStore  # noqa: E402
from trainrun.config.schema import ModelConfig, TrainRunConfig  # noqa: E402
from trainrun.data.prepare import main as prepare_main  # noqa: E402
from trainrun.data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from trainrun.distributed.env import DistEnv  # noqa: E402
from trainrun.errors import ConfigError  # noqa: E402
from trainrun.hf.config import resolve_init_from  # noqa: E402
from trainrun.hf.export import checkpoint_shapes, load_model_tensors, read_checkpoint_meta  # noqa: E402
from trainrun.hf.export import main as export_main  # noqa: E402
from trainrun.hf.import_weights import load_hf_weights  # noqa: E402
from trainrun.model import GPT, allocate, generate  # noqa: E402
from trainrun.orchestrator import build_model_and_optimizer, prepare_config  # noqa: E402

LOGIT_ATOL = 1e-5
SMALL = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, vocab_size=257)
LLAMA = dict(position="rope", mlp="swiglu", norm="rmsnorm")
GPT2 = dict(position="learned", mlp="gelu", norm="layernorm")
COMBINATIONS = {
    "llama_tied": {**LLAMA},
    "llama_untied_bias_padded": {**LLAMA, "tie_embeddings": False, "bias": True, "vocab_size": 300,
                                 "rope_theta": 500000.0, "ffn_hidden": 96, "norm_eps": 1e-6},
    "gpt2_tied_bias": {**GPT2, "bias": True},
    "gpt2_untied_nobias_padded": {**GPT2, "tie_embeddings": False, "bias": False, "vocab_size": 320},
}
MEASURED: dict[str, float] = {}
"""Largest |logit difference| per combination, printed at the end (pytest -s) for the record."""


# ---- helpers ----------------------------------------------------------------------------------------


def load_trainrun_model(step_dir: Path) -> tuple[torch.nn.Module, ModelConfig]:
    """trainrun's own GPT with the checkpoint's weights, in one CPU process (eval mode), read as the exporter
    reads them: to compare with the exported model."""
    cfg, _ = read_checkpoint_meta(step_dir)
    with torch.device("meta"):
        model = GPT(cfg)
    allocate(model, "cpu")  # every parameter is loaded below; allocate keeps the output/embedding tie
    names = [n for n, _ in model.named_parameters()]  # a tied output weight is named once, as the embedding
    model.load_state_dict(load_model_tensors(step_dir, names, checkpoint_shapes(step_dir)), strict=False)
    return model.eval(), cfg

def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT whose every parameter is random: norm weights != 1 and biases != 0, so no mis-mapping hides."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_checkpoint(model: GPT, directory: Path, step: int = 1, data: dict | None = None) -> Path:
    """A real trainrun checkpoint (DCP + trainrun.json + manifest + latest) of ``model``, as the store writes it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    meta = {"step": step, "model": dataclasses.asdict(model.cfg),
            "config": {"model": dataclasses.asdict(model.cfg), "data": data or {"name": "stdlib"}}}
    store = CheckpointStore(directory, 0, True, lambda: None)
    return store.save(step, {"model": get_model_state_dict(model)}, meta)


def export(checkpoint: Path, output: Path, *extra: str) -> None:
    rc = export_main([str(checkpoint), "--output", str(output), *extra])
    assert rc == 0


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run trainrun-export expecting exit 2 and one line on stderr containing ``needles``."""
    capsys.readouterr()
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err
    return err


def load_hf(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def max_logit_diff(model: torch.nn.Module, hf_model, vocab: int, seed: int = 1) -> float:
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.shape == theirs.shape
    return float((ours - theirs).abs().max())


def greedy_hf(hf_model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy generation (KV cache on) for exactly ``n`` tokens: no stop at EOD."""
    config = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return hf_model.generate(prompt, generation_config=config, attention_mask=torch.ones_like(prompt))


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors_torch.load_file(file))
    return tensors


# ---- export of every exportable combination ----------------------------------------------------------

@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_export_matches_transformers(name, tmp_path):
    cfg = ModelConfig(**{**SMALL, **COMBINATIONS[name]})
    model = random_model(cfg)
    step_dir = save_checkpoint(model, tmp_path / "ckpt")
    shard = ["--max-shard-size", "40KB"] if name == "llama_untied_bias_padded" else []
    export(tmp_path / "ckpt", tmp_path / "hf", *shard)
    if shard:
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    hf_model = load_hf(tmp_path / "hf")
    expected = "LlamaForCausalLM" if cfg.position == "rope" else "GPT2LMHeadModel"
    assert type(hf_model).__name__ == expected
    assert hf_model.config.vocab_size == cfg.vocab_size
    diff = max_logit_diff(model, hf_model, cfg.vocab_size)
    MEASURED[name] = diff
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert diff < LOGIT_ATOL

    prompt = torch.tensor([[10, 20, 30, 40, 50]])
    ours = generate(model, prompt, 16, temperature=0)
    assert torch.equal(greedy_hf(hf_model, prompt, 16), ours)

    # The checkpoint reader gives back the model that was saved.
    reloaded, _ = load_trainrun_model(step_dir)
    assert max_logit_diff(reloaded, hf_model, cfg.vocab_size) < LOGIT_ATOL

    # export -> import -> export: identical tensors and config.
    imported = resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf")))
    again = GPT(imported).eval()
    load_hf_weights([again], imported)
    assert max_logit_diff(again, hf_model, cfg.vocab_size) < LOGIT_ATOL
    save_checkpoint(again, tmp_path / "ckpt2")
    export(tmp_path / "ckpt2", tmp_path / "hf2", *shard)
    first, second = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "hf2")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == \
        json.loads((tmp_path / "hf2" / "config.json").read_text())


@pytest.mark.parametrize(("arch", "kv"), [(LLAMA, 2), (LLAMA, 4), ({**GPT2, "bias": True}, 4)],
                         ids=["llama_gqa", "llama_mha", "gpt2_bias"])
def test_checkpoint_with_separate_qkv_exports_as_the_fused_one(arch, kv, tmp_path):
    """A checkpoint trainrun wrote before q/k/v were fused (separate attention.wq/wk/wv) exports to the very
    files of the same weights saved fused: the way to carry such a run into this version is
    trainrun-export, then model.init_from."""
    from trainrun.model.qkv import split_qkv

    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=kv, max_seq_len=16, vocab_size=257,
                      tie_embeddings=False, **arch)
    model = random_model(cfg)
    save_checkpoint(model, tmp_path / "fused")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in [n for n in state if ".attention.wqkv." in n]:
        for part, tensor in zip(("wq", "wk", "wv"), split_qkv(state.pop(name), cfg.n_heads, cfg.kv_heads),
                                strict=True):
            state[name.replace(".wqkv.", f".{part}.")] = tensor
    meta = {"step": 1, "model": dataclasses.asdict(cfg), "config": {"model": dataclasses.asdict(cfg),
                                                                   "data": {"name": "stdlib"}}}
    CheckpointStore(tmp_path / "separate", 0, True, lambda: None).save(1, {"model": state}, meta)
    export(tmp_path / "fused", tmp_path / "out_fused")
    export(tmp_path / "separate", tmp_path / "out_separate")
    fused, separate = safetensors_of(tmp_path / "out_fused"), safetensors_of(tmp_path / "out_separate")
    assert fused.keys() == separate.keys()
    assert all(torch.equal(separate[k], fused[k]) for k in fused)


def test_byte_tokenizer_export_maps_the_same_ids(tmp_path):
    model = random_model(ModelConfig(**SMALL))
    save_checkpoint(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ByteTokenizer()
    for text in ["hello world", "  leading spaces\n\ttabs\r\n", "héllo wörld ✓ 日本語 🙂", "<|endoftext|>x", ""]:
        ids = tok(text)["input_ids"]
        if "<|endoftext|>" not in text:  # trainrun keeps that text as bytes; transformers sees the special token
            assert ids == ours.encode(text), text
            assert tok.decode(ids) == text
    assert tok.eos_token_id == ours.eod_id == 256
    assert max(tok.get_vocab().values()) == 256
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 256


def test_trained_bpe_tokenizer_is_exported(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(20):
        (texts / f"{i}.py").write_text(f"def handler_{i}(request):\n    return respond(request, {i})\n" * 5)
    data = tmp_path / "data"
    assert prepare_main([str(texts), "--output", str(data), "--tokenizer", "bpe", "--vocab-size", "300",
                         "--val-fraction", "0.2"]) == 0
    ours = load_tokenizer(data)
    save_checkpoint(random_model(ModelConfig(**{**SMALL, "vocab_size": ours.vocab_size})), tmp_path / "ckpt",
                    data={"name": "indexed", "path": str(data)})
    export(tmp_path / "ckpt", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def handler_3(request):\n    return respond(request, 3)\n"
    assert tok(text)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eod_id


def test_bfloat16_export(tmp_path):
    model = random_model(ModelConfig(**SMALL))
    save_checkpoint(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "hf", "--dtype", "bfloat16", "--no-tokenizer")
    tensors = safetensors_of(tmp_path / "hf")
    assert torch.equal(tensors["model.embed_tokens.weight"], model.tok_embeddings.weight.detach().bfloat16())
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


# ---- refusals -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [
    dict(position="rope", mlp="gelu", norm="rmsnorm"),
    dict(position="learned", mlp="swiglu", norm="layernorm"),
    dict(position="rope", mlp="swiglu", norm="layernorm"),
])
def test_unexportable_combination_is_refused(arch, tmp_path, capsys):
    save_checkpoint(random_model(ModelConfig(**{**SMALL, **arch})), tmp_path / "ckpt")
    err = refused(capsys, [str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")],
                  "no transformers equivalent", "LlamaForCausalLM", "GPT2LMHeadModel")
    assert f"position={arch['position']}, mlp={arch['mlp']}, norm={arch['norm']}" in err
    assert not (tmp_path / "hf").exists()


def test_bad_inputs_are_refused(tmp_path, capsys):
    save_checkpoint(random_model(ModelConfig(**SMALL)), tmp_path / "ckpt", step=1)
    step2 = save_checkpoint(random_model(ModelConfig(**SMALL)), tmp_path / "ckpt", step=2)
    out = str(tmp_path / "hf")
    refused(capsys, [str(tmp_path / "nowhere"), "--output", out], "does not exist")
    refused(capsys, [str(tmp_path / "ckpt"), "--output", out, "--step", "7"], "no checkpoint of step 7", "1, 2")
    refused(capsys, [str(tmp_path / "ckpt"), "--output", out, "--max-shard-size", "lots"], "not a size")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    for force in ([], ["--force"]):  # not an earlier export: --force would not replace it either
        refused(capsys, [str(tmp_path / "ckpt"), "--output", str(tmp_path / "taken"), *force],
                "not an earlier trainrun-export output", "choose a new or empty directory")
    assert (tmp_path / "taken" / "x").read_text() == "x"
    # A flipped byte in the newest checkpoint: refused with the reason, not replaced by an older one.
    shard = next(step2.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    refused(capsys, [str(tmp_path / "ckpt"), "--output", out], "step_2 is broken", "sha256", "--step")
    assert export_main([str(tmp_path / "ckpt"), "--output", out, "--step", "1"]) == 0  # the older one is fine
    # A model smaller than its data's vocabulary: the tokenizer would produce ids the model lacks.
    save_checkpoint(random_model(ModelConfig(**{**SMALL, "vocab_size": 100})), tmp_path / "small")
    refused(capsys, [str(tmp_path / "small"), "--output", str(tmp_path / "hf_small")], "257 ids", "only 100")
    save_checkpoint(random_model(ModelConfig(**SMALL)), tmp_path / "plugin", data={"name": "mydata"})
    refused(capsys, [str(tmp_path / "plugin"), "--output", str(tmp_path / "hf_plugin")], "--data", "--no-tokenizer")


# ---- import (model.init_from) -------------------------------------------------------------------------

def hf_llama(directory: Path, **overrides) -> torch.nn.Module:
    """A random transformers Llama built from a config and saved with save_pretrained (safetensors)."""
    config = transformers.LlamaConfig(**{
        "vocab_size": 257, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0}, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 256, **overrides})
    return _save_random(transformers.LlamaForCausalLM(config), directory)


def hf_gpt2(directory: Path, **overrides) -> torch.nn.Module:
    """A random transformers GPT-2 (exact GELU) built from a config and saved with save_pretrained."""
    config = transformers.GPT2Config(**{
        "vocab_size": 257, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "activation_function": "gelu", "bos_token_id": 256, "eos_token_id": 256, **overrides})
    return _save_random(transformers.GPT2LMHeadModel(config), directory)


def _save_random(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_from_transformers_model(arch, tmp_path):
    hf_model = (hf_llama if arch == "llama" else hf_gpt2)(tmp_path / "hf")
    # The shape comes from config.json.
    cfg = resolve_init_from(ModelConfig(n_layers=7, d_model=512, init_from=str(tmp_path / "hf")))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == (2, 32, 4, 257)
    cfg.validate()
    model = GPT(cfg).eval()
    load_hf_weights([model], cfg)
    assert max_logit_diff(model, hf_model, 257) < LOGIT_ATOL
    # ... and back: the exported tensors are the ones save_pretrained wrote.
    save_checkpoint(model, tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "out")
    original, exported = safetensors_of(tmp_path / "hf"), safetensors_of(tmp_path / "out")
    for key, value in original.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old GPT-2 files
            continue
        assert torch.equal(exported[key], value), key


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_from_draws_no_random_weights(arch, tmp_path, monkeypatch):
    """The orchestrator's build with model.init_from allocates and loads; it never runs a random init
    (for a large model that init, on every rank or on rank 0 with a broadcast, is wasted start-up time).
    The tie of GPT-2's output to its embedding survives the allocation without init."""
    hf_model = (hf_llama if arch == "llama" else hf_gpt2)(tmp_path / "hf")

    def no_random_init(self):  # the constructor's call on the meta device costs nothing and is allowed
        if not all(p.is_meta for p in self.parameters()):
            raise AssertionError("init_weights ran although every parameter comes from model.init_from")

    monkeypatch.setattr(GPT, "init_weights", no_random_init)
    cfg = TrainRunConfig(model=resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf"))))
    built = build_model_and_optimizer(cfg, DistEnv(0, 0, 1, torch.device("cpu"), None, "single"))
    model = built.model_parts[0]
    assert max_logit_diff(model.eval(), hf_model, 257) < LOGIT_ATOL
    assert (model.output.weight is model.tok_embeddings.weight) == cfg.model.tie_embeddings == (arch == "gpt2")


def test_init_from_original_gpt2_names(tmp_path):
    """The original GPT-2 files name tensors without the ``transformer.`` prefix and carry causal-mask buffers."""
    hf_model = hf_gpt2(tmp_path / "hf")
    tensors = safetensors_of(tmp_path / "hf")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    safetensors_torch.save_file(renamed, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    cfg = resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf")))
    model = GPT(cfg).eval()
    load_hf_weights([model], cfg)
    assert max_logit_diff(model, hf_model, 257) < LOGIT_ATOL


@pytest.mark.parametrize(("make", "overrides", "needle"), [
    ("llama", {"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='linear'"),
    ("llama", {"attention_bias": True, "mlp_bias": False}, "mlp_bias=False"),
    ("gpt2", {"activation_function": "gelu_new"}, "activation_function='gelu_new'"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_init_from_refuses_what_does_not_map(make, overrides, needle, tmp_path):
    (hf_llama if make == "llama" else hf_gpt2)(tmp_path / "hf", **overrides)
    with pytest.raises(ConfigError, match="model.init_from") as err:
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf")))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_model_config_with_init_from_reads_no_file(tmp_path):
    """Turning a config into its dataclass touches no disk: the orchestrator resolves init_from, then validates."""
    cfg = ModelConfig(n_layers=7, init_from=str(tmp_path / "missing"))
    cfg.validate()
    assert cfg.n_layers == 7
    with pytest.raises(ConfigError, match="no such directory"):
        prepare_config(TrainRunConfig(model=cfg))
    with pytest.raises(ConfigError, match=r"model.init_from=.*loads into trainrun's own model \(model.name=gpt\)"):
        prepare_config(TrainRunConfig(model=ModelConfig(name="mine", init_from=str(tmp_path / "missing"))))


def test_init_from_refuses_broken_directories(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "missing")))
    hf_llama(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match="model_type='mistral'"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "other")))
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="config.json is missing"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "no_config")))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps(config))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        resolve_init_from(ModelConfig(init_from=str(tmp_path / "pickled")))
    # A config.json that does not describe its weights: caught before anything is copied.
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    cfg = resolve_init_from(ModelConfig(init_from=str(tmp_path / "hf")))
    with pytest.raises(ConfigError, match="gate_proj.weight has shape"):
        load_hf_weights([GPT(cfg)], cfg)


# ---- the CLI: prepare with a Hugging Face tokenizer, init_from, train, export, generate -------------------

def hf_tokenizer_file(path: Path) -> Path:
    """A small byte-level BPE with '</s>' as its end token, built here (no download), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"def function_{i}(x):\n    return x * {i}\n" for i in range(200)], trainer=trainer)
    tok.save(str(path))
    return path


@pytest.mark.slow  # the three CLIs in subprocesses
def test_cli_prepare_hf_tokenizer_init_from_train_export(tmp_path, capsys):
    tokenizer = hf_tokenizer_file(tmp_path / "tokenizer.json")
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(40):
        lines = (f"def f_{i}_{j}(a, b):\n    return a + b * {j}\n" for j in range(30))
        (texts / f"doc{i}.txt").write_text("".join(lines))
    data = tmp_path / "data"
    assert prepare_main([str(texts), "--output", str(data), "--tokenizer", str(tokenizer),
                         "--val-fraction", "0.1"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"] == "hf" and meta["tokenizer_source"] == str(tokenizer.resolve())
    ours = load_tokenizer(data)
    assert ours.eod_id == meta["eod_id"] == 1  # '</s>', found without --eod-token
    assert ours.vocab_size == meta["vocab_size"] <= 300

    hf_llama(tmp_path / "init", vocab_size=meta["vocab_size"], bos_token_id=1, eos_token_id=1)
    run_dir = tmp_path / "run"
    args = [*TINY, "data.name=indexed", f"data.path={data}", f"model.init_from={tmp_path / 'init'}",
            "train.max_steps=2", "eval.interval=0", "eval.sample_tokens=0", "checkpoint.interval=0"]
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised the model from" in (run_dir / "train.log").read_text()

    out = tmp_path / "exported"
    export(run_dir, out)
    trained, cfg = load_trainrun_model(next((run_dir / "checkpoints").glob("step_2")))
    assert (cfg.d_model, cfg.ffn_hidden) == (32, 80)  # from the init model's config.json, not TINY's 64
    hf_model = load_hf(out)
    diff = max_logit_diff(trained, hf_model, meta["vocab_size"])
    MEASURED["cli_llama_init_from_hf_tokenizer"] = diff
    assert diff < LOGIT_ATOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f_1_2(a, b):\n    return"
    prompt_ids = hf_tok(text)["input_ids"]
    assert prompt_ids == ours.encode(text)  # no BOS added: the data had none
    prompt = torch.tensor([prompt_ids])
    generated = greedy_hf(hf_model, prompt, 12)
    assert torch.equal(generated, generate(trained, prompt, 12, temperature=0))
    assert hf_tok.decode(generated[0], skip_special_tokens=True) == ours.decode(generated[0].tolist())
    assert hf_tok.eos_token == "</s>"

    # The model's vocabulary must cover the data's: refused with one line, exit 2.
    hf_llama(tmp_path / "tiny_vocab", vocab_size=50, bos_token_id=1, eos_token_id=1)
    proc = run_cli([*args[:-4], f"model.init_from={tmp_path / 'tiny_vocab'}", "train.max_steps=1",
                    f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trainrun:")]
    assert len(errors) == 1 and "model.init_from=" in errors[0] and "has 50 ids" in errors[0], proc.stderr
    assert "trainrun-prepare --tokenizer" in errors[0] and "Traceback" not in proc.stderr


def test_prepare_refuses_bad_tokenizers(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"text {i}")
    out = str(tmp_path / "data")
    assert prepare_main([str(texts), "--output", out, "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert prepare_main([str(texts), "--output", out, "--tokenizer", str(tmp_path / "bad.json")]) == 2
    assert "not a tokenizers file" in capsys.readouterr().err
    tokenizer = hf_tokenizer_file(tmp_path / "tokenizer.json")
    assert prepare_main([str(texts), "--output", out, "--tokenizer", str(tokenizer), "--eod-token", "<|x|>"]) == 2
    assert "--eod-token" in capsys.readouterr().err
    assert prepare_main([str(texts), "--output", out, "--eod-token", "</s>"]) == 2
    assert "applies to a Hugging Face tokenizer" in capsys.readouterr().err


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["trainrun-export"] == "trainrun.hf.export:main"
    assert "trainrun.hf" in project["tool"]["setuptools"]["packages"]


def teardown_module():
    for name, diff in sorted(MEASURED.items()):
        print(f"measured max |logit diff| {name}: {diff:.3g}")
