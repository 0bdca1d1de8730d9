"""``model.init_from``: fill a built (possibly sharded) trainrun model with a transformers model's weights.

Every rank reads only the rows and columns of its own shards: safetensors files are memory-mapped
and ``get_slice`` reads a box of a tensor without the rest, so no rank ever holds the full model.
The box of a DTensor shard comes from its placements (the same computation DCP uses to reshard);
GPT-2's transposed ``Conv1D`` weights and the row slices that make trainrun's fused ``wqkv`` (Llama's
q_proj/k_proj/v_proj per kv group, GPT-2's ``c_attn`` reordered) are addressed through the mapping's
``Source`` (name, transpose, row offset, trainrun rows), so they need no full copy either.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from trainrun.config.schema import ModelConfig
from trainrun.errors import ConfigError
from trainrun.hf.mapping import Source, import_sources
from trainrun.hf.safetensors_io import HFWeights

logger = logging.getLogger(__name__)


def _check_shapes(weights: HFWeights, sources: dict[str, tuple[Source, ...]],
                  shapes: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor holds the trainrun rows mapped into it (a config.json that lies is caught here)."""
    needed: dict[str, tuple[list[int], bool]] = {}
    for name, shape in shapes.items():
        for src in sources[name]:
            want, _ = needed.setdefault(src.hf_name, ([0, *shape[1:]], src.transpose))
            want[0] = max(want[0], src.offset + (src.rows or shape[0]))
    for hf_name, (want, transpose) in needed.items():
        want = want[::-1] if transpose else want
        have = weights.shape(hf_name)
        if list(have) != want:
            raise ConfigError(weights.field, weights.directory, f"{hf_name} has shape {list(have)} but config.json "
                              f"implies {want}; the weights do not belong to this config.json")


def _read_box(weights: HFWeights, sources: tuple[Source, ...], offsets: tuple[int, ...],
              sizes: tuple[int, ...]) -> torch.Tensor:
    """The box ``offsets``/``sizes`` of a trainrun tensor, read from every stored tensor whose rows it covers
    (one for most; the fused wqkv's rows come from q_proj/k_proj/v_proj or c_attn slices)."""
    lo, hi = offsets[0], offsets[0] + sizes[0]
    parts = []
    for src in sources:
        stop = src.start + src.rows if src.rows else hi
        a, b = max(lo, src.start), min(hi, stop)
        if a < b:  # stored row = trainrun row - start + offset
            shifted = Source(src.hf_name, src.transpose, src.offset - src.start)
            parts.append(weights.read(shifted, (a, *offsets[1:]), (b - a, *sizes[1:])))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of this rank's part of ``tensor`` in the full tensor's coordinates."""
    if not isinstance(tensor, DTensor):
        return (0,) * tensor.dim(), tuple(tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offsets), tuple(sizes)


@torch.no_grad()
def load_hf_weights(parts: Iterable[nn.Module], cfg: ModelConfig) -> None:
    """Copy the weights of ``cfg.init_from`` into every parameter of ``parts`` (this rank's shards only).

    ``cfg`` already carries the architecture of ``cfg.init_from`` (:func:`trainrun.hf.config.resolve_init_from`
    took it from its config.json). Parameter names are the layout-independent ones of ``get_model_state_dict``, whose
    tensors share storage with the parameters, so the copy lands in the model in place.
    """
    sources = import_sources(cfg)
    with HFWeights(cfg.init_from) as weights:
        states = [get_model_state_dict(part) for part in parts]
        shapes = {name: tuple(t.shape) for state in states for name, t in state.items() if name in sources}
        _check_shapes(weights, sources, shapes)
        for state in states:
            for name, tensor in state.items():
                if name not in sources:
                    raise ConfigError("model.init_from", cfg.init_from,
                                      f"trainrun's model has {name}, which the mapping does not cover")
                offsets, sizes = _local_box(tensor)
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                if local.numel() == 0:  # an uneven shard can be empty on the last ranks
                    continue
                local.copy_(_read_box(weights, sources[name], offsets, sizes).reshape(local.shape))
    logger.info("initialised the model from %s", cfg.init_from)
