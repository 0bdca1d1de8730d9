"""Training data: Megatron indexed datasets, tokenizers, the bundled corpus, blends and the sample loader.

Importing :mod:`trainrun.data.datasets` registers the ``stdlib`` and ``indexed`` datasets. The names
below are imported on first use (PEP 562), so ``trainrun-prepare``, which needs none of the loader's
torch, starts without importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "build_stdlib_corpus": "corpus",
    "TokenDataset": "datasets",
    "open_dataset_dir": "datasets",
    "IndexedDataset": "indexed",
    "IndexedDatasetWriter": "indexed",
    "token_dtype": "indexed",
    "DatasetDirWriter": "layout",
    "compute_checksum": "layout",
    "read_meta": "layout",
    "BatchIterator": "loader",
    "BlendedStream": "loader",
    "EvalSet": "loader",
    "SampleStream": "loader",
    "build_train_iterator": "loader",
    "eval_sample_count": "loader",
    "DataSources": "sources",
    "SplitView": "sources",
    "open_sources": "sources",
    "BPETokenizer": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
}

__all__ = [
    "BPETokenizer",
    "BatchIterator",
    "BlendedStream",
    "ByteTokenizer",
    "DataSources",
    "DatasetDirWriter",
    "EvalSet",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SampleStream",
    "SplitView",
    "TokenDataset",
    "Tokenizer",
    "build_stdlib_corpus",
    "build_train_iterator",
    "compute_checksum",
    "eval_sample_count",
    "load_tokenizer",
    "open_dataset_dir",
    "open_sources",
    "read_meta",
    "token_dtype",
    "train_bpe",
]

if TYPE_CHECKING:
    from trainrun.data.corpus import build_stdlib_corpus
    from trainrun.data.datasets import TokenDataset, open_dataset_dir
    from trainrun.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
    from trainrun.data.layout import DatasetDirWriter, compute_checksum, read_meta
    from trainrun.data.loader import (
        BatchIterator,
        BlendedStream,
        EvalSet,
        SampleStream,
        build_train_iterator,
        eval_sample_count,
    )
    from trainrun.data.sources import DataSources, SplitView, open_sources
    from trainrun.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
