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
Llama does), so q/k rows need no permutation. trainrun's q/k/v are one ``wqkv`` in Megatron's
head-interleaved layout ([query heads of kv group g, k_g, v_g] for each g, :mod:`trainrun.model.qkv`):
Llama's ``q_proj``/``k_proj``/``v_proj`` (``k_proj``/``v_proj`` have ``n_kv_heads*head_dim`` rows with
grouped-query attention) are each the concatenation of one row range per group of it. GPT-2 has no
grouped layout; its ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``, and its
``c_attn`` is q, k and v concatenated, i.e. wqkv's rows reordered.

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

    ``sources`` are trainrun names concatenated along dim 0; ``ranges``, if given, the rows [a, b) of each
    source taken (slices of the fused ``wqkv``), else each source is taken whole; no sources means zeros
    of ``shape`` (a bias trainrun does not have). ``transpose``: stored as (in, out) (GPT-2's ``Conv1D``)
    instead of ``nn.Linear``'s (out, in).
    """

    hf_name: str
    sources: tuple[str, ...]
    transpose: bool = False
    ranges: tuple[tuple[int, int], ...] = ()
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where rows of one trainrun tensor live in a transformers checkpoint: trainrun rows [start, start+rows)
    (``rows`` 0: all of them) are ``hf[offset:offset+rows]`` (rows of the (out, in) view; ``transpose``: the
    stored tensor is (in, out)). A tensor taken whole has one Source; the fused wqkv one per slice."""

    hf_name: str
    transpose: bool = False
    offset: int = 0
    start: int = 0
    rows: int = 0


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


def qkv_segments(n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, list[tuple[int, int, int]]]:
    """"q"/"k"/"v" -> [(first row in wqkv, first row in the separate projection, rows)], one per kv group, in order."""
    per = n_heads // n_kv_heads
    group = (per + 2) * head_dim
    out: dict[str, list[tuple[int, int, int]]] = {"q": [], "k": [], "v": []}
    for g in range(n_kv_heads):
        out["q"].append((g * group, g * per * head_dim, per * head_dim))
        out["k"].append((g * group + per * head_dim, g * head_dim, head_dim))
        out["v"].append((g * group + (per + 1) * head_dim, g * head_dim, head_dim))
    return out


def _linear(hf: str, tr: str, bias: bool, transpose: bool, out_rows: int, gpt2_bias: bool) -> Iterator[Target]:
    """Weight (and bias) of one linear layer; GPT-2 gets a zero bias where trainrun has none."""
    yield Target(f"{hf}.weight", (f"{tr}.weight",), transpose)
    if bias:
        yield Target(f"{hf}.bias", (f"{tr}.bias",))
    elif gpt2_bias:
        yield Target(f"{hf}.bias", (), shape=(out_rows,))


def _qkv(hf: str, fused: str, segments: list[tuple[int, int, int]], bias: bool, transpose: bool) -> Iterator[Target]:
    """A transformers tensor made of row ranges of trainrun's fused ``wqkv`` (weight, and bias if any)."""
    ranges = tuple((start, start + rows) for start, _, rows in segments)
    yield Target(f"{hf}.weight", (f"{fused}.weight",) * len(ranges), transpose, ranges)
    if bias:
        yield Target(f"{hf}.bias", (f"{fused}.bias",) * len(ranges), False, ranges)


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
        segments = qkv_segments(cfg.n_heads, cfg.kv_heads, cfg.head_dim)
        for hf_proj, part in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
            yield from _qkv(f"{hf}.self_attn.{hf_proj}", f"{tr}.attention.wqkv", segments[part], cfg.bias, False)
        yield from _linear(f"{hf}.self_attn.o_proj", f"{tr}.attention.wo", cfg.bias, False, cfg.d_model,
                           gpt2_bias=False)
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
        segments = qkv_segments(cfg.n_heads, cfg.kv_heads, cfg.head_dim)
        qkv = segments["q"] + segments["k"] + segments["v"]  # c_attn is [q; k; v]: wqkv's rows reordered
        yield from _qkv(f"{hf}.attn.c_attn", f"{tr}.attention.wqkv", qkv, cfg.bias, True)
        if not cfg.bias:
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


def import_sources(cfg: ModelConfig) -> dict[str, tuple[Source, ...]]:
    """trainrun parameter name -> where its rows live in a transformers checkpoint, by trainrun row (the
    inverse of export_targets)."""
    sources: dict[str, list[Source]] = {}
    for target in export_targets(cfg):
        offset = 0
        for i, name in enumerate(target.sources):
            if not target.ranges:
                sources.setdefault(name, []).append(Source(target.hf_name, target.transpose))
                continue
            start, stop = target.ranges[i]
            sources.setdefault(name, []).append(Source(target.hf_name, target.transpose, offset, start, stop - start))
            offset += stop - start
    if cfg.tie_embeddings:
        sources["output.weight"] = sources["tok_embeddings.weight"]
    return {name: tuple(sorted(parts, key=lambda s: s.start)) for name, parts in sources.items()}
