"""A DCP storage reader that never unpickles arbitrary objects.

DCP writes its ``.metadata`` with ``pickle`` (protocol 4); a checkpoint from an unknown source
could run code when that is loaded, and a manifest does not help (whoever writes the checkpoint
writes the manifest). This reader unpickles it with an allow-list of exact, fully qualified names:
the classes DCP's metadata is made of, torch's dtypes and a few harmless constructors. Never a
module prefix and never a dotted attribute path (protocol 4 resolves ``name="os.system"`` against
any module that imported ``os``). PyTorch's own ``weights_only`` unpickler cannot take over: it
does not read protocol 4 (its FRAME opcode). trainrun itself stores no pickled values in DCP
(non-tensor state is JSON).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"), (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "TensorProperties"), (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"), (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
}) | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
"""Every global a DCP ``.metadata`` may name: exact (module, name) pairs, nothing else."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's metadata is not DCP metadata made of allowed classes."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:  # exact pairs: no prefixes, no dotted attribute paths
            raise UnsafeCheckpointError(f"checkpoint metadata references {module}.{name}, which trainrun does not load")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("checkpoint metadata uses persistent ids, which DCP metadata never does")


def load_metadata(stream: Any, where: str) -> Metadata:
    """Unpickle DCP metadata from ``stream`` with the allow-list; anything else raises UnsafeCheckpointError."""
    try:
        metadata = _RestrictedUnpickler(stream).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed input is reported the same way, nothing ran
        raise UnsafeCheckpointError(f"{where} is not DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{where} does not hold DCP metadata (found {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Load ``.metadata`` allowing only DCP's own metadata classes."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
