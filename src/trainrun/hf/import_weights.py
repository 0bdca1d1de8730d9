"""``model.init_from``: fill a built (possibly sharded) trainrun model with a transformers model's weights.

Every rank reads only the rows and columns of its own shards: safetensors files are memory-mapped
and ``get_slice`` reads a box of a tensor without the rest, so no rank ever holds the full model.
The box of a DTensor shard comes from its placements (the same computation DCP uses to reshard);
GPT-2's transposed ``Conv1D`` weights and its fused q/k/v are addressed through the mapping's
``Source`` (name, transpose, row offset), so they need no full copy either.
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


def _check_shapes(weights: HFWeights, sources: dict[str, Source], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor holds the trainrun tensors mapped into it (a config.json that lies is caught here)."""
    needed: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        src = sources[name]
        stored = shape[::-1] if src.transpose else shape
        rows = src.offset + shape[0]
        want = needed.setdefault(src.hf_name, list(stored))
        if src.transpose:
            want[-1] = max(want[-1], rows)
        else:
            want[0] = max(want[0], rows)
    for hf_name, want in needed.items():
        have = weights.shape(hf_name)
        if list(have) != want:
            raise ConfigError(weights.field, weights.directory, f"{hf_name} has shape {list(have)} but config.json "
                              f"implies {want}; the weights do not belong to this config.json")


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
                local.copy_(weights.read(sources[name], offsets, sizes).reshape(local.shape))
    logger.info("initialised the model from %s", cfg.init_from)
