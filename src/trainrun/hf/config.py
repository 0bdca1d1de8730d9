"""The ``config.json`` of a transformers model, both ways: written for an export, read for ``model.init_from``.

Written by hand rather than by transformers' config classes, so that neither direction needs
transformers. Reading it is a step of the run's start-up (:func:`resolve_init_from`, called by the
orchestrator): the config layer itself reads no file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from trainrun.config.choices import Mlp, Norm, Position, RopeScaling
from trainrun.config.schema import ModelConfig, RopeScalingConfig
from trainrun.errors import ConfigError
from trainrun.hf.mapping import architecture
from trainrun.hf.safetensors_io import weight_files

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


# ---- export: ModelConfig -> config.json -----------------------------------------------------------

def hf_config(cfg: ModelConfig, eos_id: int | None, bos_id: int | None, dtype: str) -> dict[str, Any]:
    """The ``config.json`` of the transformers model equivalent to ``cfg`` (weights stored as ``dtype``).

    Written by hand rather than by transformers' config classes so that exporting needs no
    transformers and the file reads in old and new releases alike: RoPE's base goes both to
    ``rope_theta`` (transformers 4.x) and to ``rope_parameters`` (5.x), and Llama 3.1's scaling both to
    ``rope_scaling`` (4.x) and to ``rope_parameters``.
    """
    model_type, arch = architecture(cfg)
    common = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "initializer_range": cfg.init_std, "use_cache": True, "torch_dtype": dtype, "dtype": dtype}
    if model_type == "llama":
        scaling = _rope_scaling(cfg.rope_scaling)
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if scaling is None \
            else {**scaling, "rope_theta": cfg.rope_theta}
        return {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden_size(),
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "rope_theta": cfg.rope_theta, "rope_parameters": rope,
                **({"rope_scaling": scaling} if scaling is not None else {}),
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
                "pretraining_tp": 1}
    return {**common, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden_size(),
            # trainrun's GELU is the exact erf form; GPT-2's default "gelu_new" is the tanh approximation.
            "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def _rope_scaling(scaling: RopeScalingConfig) -> dict[str, Any] | None:
    """transformers' ``rope_scaling`` of ``model.rope_scaling`` (None for plain RoPE)."""
    if scaling.type is RopeScaling.none:
        return None
    return {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


# ---- import: config.json -> ModelConfig fields ----------------------------------------------------

ARCHITECTURE_FIELDS = ("n_layers", "n_heads", "n_kv_heads", "d_model", "ffn_hidden", "vocab_size", "max_seq_len",
                       "norm", "norm_eps", "position", "rope_theta", "rope_scaling", "mlp", "tie_embeddings", "bias")
"""ModelConfig fields that ``model.init_from`` takes from the transformers ``config.json``."""


def read_hf_config(directory: str | Path, field: str = "model.init_from") -> dict[str, Any]:
    """The parsed ``config.json`` of a local transformers model directory; ConfigError naming ``field`` if unusable."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(field, str(directory), "no such directory; give a local Hugging Face model directory "
                          "(config.json + model.safetensors), e.g. one written by save_pretrained or trainrun-export")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(field, str(directory), "config.json is missing, so this is not a Hugging Face model "
                          "directory") from None
    except (OSError, ValueError) as err:
        raise ConfigError(field, str(directory), f"config.json is unreadable ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(field, str(directory), "config.json does not hold a JSON object")
    return config


def _require(hf: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)]
    if missing:
        raise ConfigError("model.init_from", where, f"config.json lacks integer {', '.join(missing)}")


def _refuse_unless(ok: bool, where: str, key: str, value: object, why: str) -> None:
    if not ok:
        raise ConfigError("model.init_from", where, f"config.json has {key}={value!r}, which does not map to "
                          f"trainrun's model: {why}")


def _llama_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _require(hf, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "max_position_embeddings"), where)
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    act = hf.get("hidden_act", "silu")
    _refuse_unless(act == "silu", where, "hidden_act", act, "the SwiGLU MLP uses silu")
    kv = hf.get("num_key_value_heads") or heads
    _refuse_unless(isinstance(kv, int) and kv > 0 and heads % kv == 0, where, "num_key_value_heads", kv,
                   f"must divide num_attention_heads={heads} (grouped-query attention)")
    head_dim = hf.get("head_dim") or width // heads
    _refuse_unless(head_dim * heads == width, where, "head_dim", head_dim, "must be hidden_size/num_attention_heads")
    rope = hf.get("rope_parameters") or {}
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    _refuse_unless(attn_bias == mlp_bias, where, "mlp_bias", mlp_bias,
                   f"model.bias applies to every linear layer, so it must equal attention_bias={attn_bias}")
    return {"n_layers": hf["num_hidden_layers"], "n_heads": heads, "n_kv_heads": None if kv == heads else kv,
            "d_model": width, "ffn_hidden": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
            "max_seq_len": hf["max_position_embeddings"], "norm": Norm.rmsnorm,
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "position": Position.rope,
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "rope_scaling": _llama_rope_scaling(hf, where), "mlp": Mlp.swiglu,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "bias": attn_bias}


def _llama_rope_scaling(hf: dict[str, Any], where: str) -> RopeScalingConfig:
    """``model.rope_scaling`` of a Llama config.json: from ``rope_parameters`` (transformers 5.x) or
    ``rope_scaling`` (4.x); ConfigError for another type (linear, dynamic, yarn, ...)."""
    rope, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    params = rope if rope.get("rope_type", "default") != "default" or not scaling else scaling
    rope_type = params.get("rope_type") or params.get("type") or "default"
    _refuse_unless(rope_type in ("default", "llama3"), where, "rope_type", rope_type,
                   "trainrun's RoPE is unscaled (default) or scaled as Llama 3.1 does (llama3)")
    if rope_type == "default":
        return RopeScalingConfig()
    numbers = ("factor", "low_freq_factor", "high_freq_factor")
    bad = [k for k in numbers if not isinstance(params.get(k), (int, float)) or isinstance(params.get(k), bool)]
    _refuse_unless(not bad, where, "rope_scaling", params, f"llama3 scaling needs numbers {', '.join(bad)}")
    original = params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
    return RopeScalingConfig(type=RopeScaling.llama3, factor=float(params["factor"]),
                             low_freq_factor=float(params["low_freq_factor"]),
                             high_freq_factor=float(params["high_freq_factor"]),
                             original_max_position_embeddings=int(original))


def _gpt2_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _require(hf, ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"), where)
    act = hf.get("activation_function", "gelu_new")
    _refuse_unless(act == "gelu", where, "activation_function", act,
                   "trainrun's GELU is the exact (erf) one, transformers calls it 'gelu'")
    _refuse_unless(hf.get("scale_attn_weights", True), where, "scale_attn_weights", False,
                   "attention scores are always scaled by 1/sqrt(head size)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _refuse_unless(not hf.get(key, False), where, key, True, "not part of trainrun's decoder block")
    return {"n_layers": hf["n_layer"], "n_heads": hf["n_head"], "d_model": hf["n_embd"],
            "ffn_hidden": hf.get("n_inner") or 4 * hf["n_embd"], "vocab_size": hf["vocab_size"],
            "n_kv_heads": None, "rope_scaling": RopeScalingConfig(),
            "max_seq_len": hf["n_positions"], "norm": Norm.layernorm,
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "position": Position.learned, "mlp": Mlp.gelu,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "bias": True}


def model_fields_from_hf(directory: str | Path) -> dict[str, Any]:
    """The ModelConfig architecture fields (ARCHITECTURE_FIELDS) of the transformers model in ``directory``.

    Raises ConfigError naming ``model.init_from`` and the ``config.json`` key that does not map.
    """
    hf = read_hf_config(directory)
    model_type = hf.get("model_type")
    where = str(directory)
    if model_type == "llama":
        return _llama_fields(hf, where)
    if model_type == "gpt2":
        return _gpt2_fields(hf, where)
    raise ConfigError("model.init_from", where, f"config.json has model_type={model_type!r}; trainrun initialises "
                      "from 'llama' (LlamaForCausalLM) and 'gpt2' (GPT2LMHeadModel) models")


def resolve_init_from(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the architecture of ``model.init_from``'s ``config.json`` (``cfg`` itself when it is null).

    A step of the run's start-up, before validation, so that every later check (TP divisibility,
    seq_len, the dry run's estimates, a resume's shape check) sees the shape of the model that will
    be built. Also checks that the weights are there, as safetensors, before any process starts.
    Raises ConfigError naming ``model.init_from``.
    """
    if cfg.init_from is None:
        return cfg
    if not isinstance(cfg.init_from, str) or not cfg.init_from:
        raise ConfigError("model.init_from", cfg.init_from, "must be a directory path or null")
    if cfg.name != "gpt":  # the mapping (mapping.py) is that of trainrun's GPT, not of a plugin's model
        raise ConfigError("model.init_from", cfg.init_from, "loads into trainrun's own model "
                          f"(model.name=gpt), not {cfg.name!r}; unset one of them")
    fields = model_fields_from_hf(cfg.init_from)
    changed = [f"{k}={fields[k]!r}" for k in fields if str(getattr(cfg, k)) != str(fields[k])]
    if changed:
        logger.info("model.init_from=%s sets %s", cfg.init_from, ", ".join(changed))
    weight_files(cfg.init_from)
    return dataclasses.replace(cfg, **fields)
