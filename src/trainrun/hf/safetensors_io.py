"""The safetensors files of a transformers model directory: their names, which file holds which tensor,
reading boxes of tensors memory-mapped, and writing shards with their index.

Only safetensors are read or written: a ``pytorch_model.bin`` is a pickle, which can run code when
loaded. The ``safetensors`` package is imported only when weights are read or written (the ``hf`` extra).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from trainrun.errors import ConfigError
from trainrun.extras import require
from trainrun.hf.mapping import Source

if TYPE_CHECKING:
    import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(directory: str | Path, field: str = "model.init_from") -> dict[str, Path]:
    """tensor name -> safetensors file of the model in ``directory`` (one file, or shards and their index).

    Only safetensors are read: a ``pytorch_model.bin`` is a pickle, which can run code when loaded.
    """
    path = Path(directory).expanduser()
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(name): path / str(file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(field, str(directory), f"{SAFETENSORS_INDEX} is unreadable ({err})") from None
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise ConfigError(field, str(directory), f"{SAFETENSORS_INDEX} names missing shard(s) {', '.join(missing)}")
        return files
    if (path / SAFETENSORS_FILE).is_file():
        return {"": path / SAFETENSORS_FILE}  # one file: every name is in it
    pickled = [p.name for p in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if p.is_file()]
    hint = (f"it has {pickled[0]}, a pickle trainrun does not load (it can run code); convert it with "
            "save_pretrained(..., safe_serialization=True)") if pickled else "no weights found"
    raise ConfigError(field, str(directory), f"{SAFETENSORS_FILE} (or {SAFETENSORS_INDEX}) is missing: {hint}")


def shard_names(count: int) -> list[str]:
    """The file names of a model saved as ``count`` safetensors files (transformers' own scheme)."""
    return [SAFETENSORS_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file (``format: pt`` metadata, as transformers writes it)."""
    require("safetensors", "hf", "trainrun-export")
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def write_index(directory: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """Write the index that names each tensor's shard (only a model of several files has one)."""
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


_PREFIXES = ("transformer.", "model.")
"""Prefixes some checkpoints omit (the original GPT-2 files name ``h.0...`` rather than ``transformer.h.0...``)."""


class HFWeights:
    """Read boxes of named tensors from a local transformers model's safetensors files, memory-mapped."""

    def __init__(self, directory: str | Path, field: str = "model.init_from"):
        require("safetensors", "hf", field)
        from safetensors import safe_open

        self.directory, self.field = str(directory), field
        self._stack = ExitStack()
        self._names: dict[str, object] = {}  # tensor name -> the open file holding it
        for file in sorted(set(weight_files(directory, field).values())):
            handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self._names[name] = handle

    def close(self) -> None:
        """Release the memory maps."""
        self._stack.close()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, name: str):
        for candidate in (name, *(name.removeprefix(p) for p in _PREFIXES if name.startswith(p))):
            if candidate in self._names:
                return self._names[candidate], candidate
        raise ConfigError(self.field, self.directory, f"the safetensors weights lack {name}, which config.json's "
                          "architecture needs")

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of tensor ``name``."""
        handle, stored = self._handle(name)
        return tuple(handle.get_slice(stored).get_shape())

    def read(self, source: Source, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The box ``offsets``/``sizes`` (in trainrun's (out, in) coordinates) of the tensor ``source`` locates."""
        handle, stored = self._handle(source.hf_name)
        piece = handle.get_slice(stored)
        box = [slice(o, o + n) for o, n in zip(offsets, sizes, strict=True)]
        box[0] = slice(box[0].start + source.offset, box[0].stop + source.offset)
        if not source.transpose:
            return piece[tuple(box)]
        return piece[tuple(reversed(box))].t()  # (in, out) on disk: read the transposed box
