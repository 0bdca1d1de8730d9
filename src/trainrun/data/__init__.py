"""Training data: Megatron indexed datasets, tokenizers, the bundled corpus and the sample loader.

Importing :mod:`trainrun.data.datasets` registers the ``stdlib`` and ``indexed`` datasets.
"""

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
from trainrun.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BPETokenizer",
    "BatchIterator",
    "BlendedStream",
    "DataSources",
    "EvalSet",
    "ByteTokenizer",
    "DatasetDirWriter",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "SampleStream",
    "SplitView",
    "TokenDataset",
    "Tokenizer",
    "build_stdlib_corpus",
    "build_train_iterator",
    "eval_sample_count",
    "compute_checksum",
    "load_tokenizer",
    "open_dataset_dir",
    "read_meta",
    "token_dtype",
    "train_bpe",
    "open_sources",
]
