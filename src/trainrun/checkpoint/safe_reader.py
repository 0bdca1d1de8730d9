"""A DCP storage reader that never unpickles arbitrary objects.

DCP writes its ``.metadata`` with ``pickle``; a checkpoint from an unknown source could run
code when that is loaded. This reader unpickles it with an allow-list of the classes DCP's
metadata is made of (the same idea as ``torch.load(weights_only=True)``) and refuses anything
else. trainrun itself stores no pickled values in DCP (non-tensor state is JSON).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"), ("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's metadata references a class outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or (module, name) in _ALLOWED or module.startswith(_ALLOWED_PREFIXES):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}, which trainrun does not load")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Load ``.metadata`` allowing only DCP's own metadata classes."""
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _RestrictedUnpickler(stream).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
