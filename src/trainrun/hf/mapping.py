"""How trainrun's GPT maps onto Hugging Face transformers' Llama and GPT-2, tensor by tensor, in both directions.

Pure data, no torch: the exporter, the importer and :mod:`trainrun.hf.config` (the ``config.json``
of each architecture) all read this one table, and it imports nothing of trainrun's but
``trainrun.config``.

================================================  ======================  ====================
trainrun ``model.*``                              transformers class      ``model_type``
================================================  ======================  ====================
position=rope, mlp=swiglu, norm=rmsnorm           ``LlamaForCausalLM``    ``llama``
position=learned, mlp=gelu, norm=layernorm        ``GPT2LMHeadModel``     ``gpt2``
================================================  ======================  ====================

``bias`` and ``tie_embeddings`` may take either value in both rows (Llama's ``attention_bias`` and
``mlp_bias``; GPT-2 always has biases, which are exported as zeros when trainrun has none).
trainrun's RoPE already rotates the two halves of each head (``rotate_half``, as transformers'
Llama does), so q/k rows need no permutation. With grouped-query attention (``n_kv_heads``,
Llama's ``num_key_value_heads``) ``k_proj``/``v_proj`` have ``n_kv_heads*head_dim`` rows, as trainrun's
``wk``/``wv``; GPT-2 has no such layout. GPT-2's ``Conv1D`` stores weights as (in, out),
the transpose of ``nn.Linear``, and its ``c_attn`` is q, k and v concatenated.

Every tensor of the exported model is described once, by a :class:`Target`; importing reads the
same table backwards, so export -> import -> export gives back identical tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainrun.config.choices import Mlp, Norm, Position
from trainrun.config.schema import ModelConfig

EXPORTABLE = {
    (Position.rope, Mlp.swiglu, Norm.rmsnorm): ("llama", "LlamaForCausalLM"),
    (Position.learned, Mlp.gelu, Norm.layernorm): ("gpt2", "GPT2LMHeadModel"),
}
"""(model.position, model.mlp, model.norm) -> (transformers model_type, architecture class)."""

SUPPORTED_TEXT = ("position=rope+mlp=swiglu+norm=rmsnorm (LlamaForCausalLM) or "
                  "position=learned+mlp=gelu+norm=layernorm (GPT2LMHeadModel), bias and tie_embeddings either way")
"""The exportable combinations, as error messages name them."""


class ExportError(Exception):
    """A checkpoint, option or directory that cannot be exported; one line for the user."""


@dataclass(frozen=True)
class Target:
    """One tensor of the transformers model and the trainrun tensors it is made of.

    ``sources`` are trainrun names concatenated along dim 0 (GPT-2's ``c_attn`` is q, k, v; each
    source has ``rows`` rows); none means zeros of ``shape`` (a bias trainrun does not have).
    ``transpose``: stored as (in, out) (GPT-2's ``Conv1D``) instead of ``nn.Linear``'s (out, in).
    """

    hf_name: str
    sources: tuple[str, ...]
    transpose: bool = False
    rows: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where one trainrun tensor lives in a transformers checkpoint: ``hf[offset:offset+n]`` (rows of the
    (out, in) view; ``transpose``: the stored tensor is (in, out))."""

    hf_name: str
    transpose: bool = False
    offset: int = 0


def architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(model_type, architecture class) for ``cfg``; ExportError naming the exportable combinations otherwise."""
    key = (cfg.position, cfg.mlp, cfg.norm)
    if key not in EXPORTABLE:
        raise ExportError(f"model position={key[0]}, mlp={key[1]}, norm={key[2]} has no transformers equivalent; "
                          f"exportable: {SUPPORTED_TEXT}")
    if EXPORTABLE[key][0] == "gpt2" and cfg.kv_heads != cfg.n_heads:
        raise ExportError(f"model n_kv_heads={cfg.n_kv_heads} (grouped-query attention) has no GPT2LMHeadModel "
                          "equivalent; only the Llama layout (position=rope, mlp=swiglu, norm=rmsnorm) exports it")
    return EXPORTABLE[key]


def _linear(hf: str, tr: str, bias: bool, transpose: bool, out_rows: int, gpt2_bias: bool) -> Iterator[Target]:
    """Weight (and bias) of one linear layer; GPT-2 gets a zero bias where trainrun has none."""
    yield Target(f"{hf}.weight", (f"{tr}.weight",), transpose)
    if bias:
        yield Target(f"{hf}.bias", (f"{tr}.bias",))
    elif gpt2_bias:
        yield Target(f"{hf}.bias", (), shape=(out_rows,))


def _norm(hf: str, tr: str, cfg: ModelConfig, gpt2: bool) -> Iterator[Target]:
    yield Target(f"{hf}.weight", (f"{tr}.weight",))
    if gpt2:  # nn.LayerNorm(bias=False) has no bias; GPT-2's LayerNorm always does
        yield Target(f"{hf}.bias", (f"{tr}.bias",)) if cfg.bias else Target(f"{hf}.bias", (), shape=(cfg.d_model,))


def _llama_targets(cfg: ModelConfig) -> Iterator[Target]:
    yield Target("model.embed_tokens.weight", ("tok_embeddings.weight",))
    ffn = cfg.ffn_hidden_size()
    for i in range(cfg.n_layers):
        hf, tr = f"model.layers.{i}", f"layers.{i}"
        yield from _norm(f"{hf}.input_layernorm", f"{tr}.attention_norm", cfg, gpt2=False)
        for hf_proj, tr_proj in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            yield from _linear(f"{hf}.self_attn.{hf_proj}", f"{tr}.attention.{tr_proj}", cfg.bias, False,
                               cfg.d_model, gpt2_bias=False)
        yield from _norm(f"{hf}.post_attention_layernorm", f"{tr}.mlp_norm", cfg, gpt2=False)
        mlp = (("gate_proj", "w1", ffn), ("up_proj", "w3", ffn), ("down_proj", "w2", cfg.d_model))
        for hf_proj, tr_proj, rows in mlp:
            yield from _linear(f"{hf}.mlp.{hf_proj}", f"{tr}.mlp.{tr_proj}", cfg.bias, False, rows, gpt2_bias=False)
    yield Target("model.norm.weight", ("norm.weight",))
    if not cfg.tie_embeddings:
        yield Target("lm_head.weight", ("output.weight",))


def _gpt2_targets(cfg: ModelConfig) -> Iterator[Target]:
    c, ffn = cfg.d_model, cfg.ffn_hidden_size()
    yield Target("transformer.wte.weight", ("tok_embeddings.weight",))
    yield Target("transformer.wpe.weight", ("pos_embeddings.weight",))
    for i in range(cfg.n_layers):
        hf, tr = f"transformer.h.{i}", f"layers.{i}"
        yield from _norm(f"{hf}.ln_1", f"{tr}.attention_norm", cfg, gpt2=True)
        qkv = tuple(f"{tr}.attention.{w}" for w in ("wq", "wk", "wv"))
        yield Target(f"{hf}.attn.c_attn.weight", tuple(f"{n}.weight" for n in qkv), transpose=True, rows=c)
        if cfg.bias:
            yield Target(f"{hf}.attn.c_attn.bias", tuple(f"{n}.bias" for n in qkv), rows=c)
        else:
            yield Target(f"{hf}.attn.c_attn.bias", (), shape=(3 * c,))
        yield from _linear(f"{hf}.attn.c_proj", f"{tr}.attention.wo", cfg.bias, True, c, gpt2_bias=True)
        yield from _norm(f"{hf}.ln_2", f"{tr}.mlp_norm", cfg, gpt2=True)
        yield from _linear(f"{hf}.mlp.c_fc", f"{tr}.mlp.w1", cfg.bias, True, ffn, gpt2_bias=True)
        yield from _linear(f"{hf}.mlp.c_proj", f"{tr}.mlp.w2", cfg.bias, True, c, gpt2_bias=True)
    yield from _norm("transformer.ln_f", "norm", cfg, gpt2=True)
    if not cfg.tie_embeddings:
        yield Target("lm_head.weight", ("output.weight",))


def export_targets(cfg: ModelConfig) -> list[Target]:
    """Every tensor of the transformers model of ``cfg``, in the order transformers names them."""
    model_type, _ = architecture(cfg)
    return list(_llama_targets(cfg) if model_type == "llama" else _gpt2_targets(cfg))


def import_sources(cfg: ModelConfig) -> dict[str, Source]:
    """trainrun parameter name -> where it lives in a transformers checkpoint (the inverse of export_targets)."""
    sources: dict[str, Source] = {}
    for target in export_targets(cfg):
        for i, name in enumerate(target.sources):
            sources[name] = Source(target.hf_name, target.transpose, i * target.rows)
    if cfg.tie_embeddings:
        sources["output.weight"] = sources["tok_embeddings.weight"]
    return sources
