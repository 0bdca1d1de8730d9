"""Tokenizers: raw UTF-8 bytes, or a byte-level BPE trained locally with HuggingFace ``tokenizers``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from trainrun.config.errors import ConfigError

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What training and sampling need from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the model's embedding rows)."""
        ...

    @property
    def eod_id(self) -> int:
        """End-of-document token id, appended to every stored document."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOD appended)."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; never raises on ids that do not form valid UTF-8."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 plus EOD = 256 (vocab 257): no training, no unknown tokens."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        """257: the 256 byte values and EOD."""
        return 257

    @property
    def eod_id(self) -> int:
        """256."""
        return 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; EOD and invalid UTF-8 become U+FFFD rather than raising."""
        # EOD (and anything out of byte range, e.g. from an untrained model) is not a byte.
        data = bytes(i if 0 <= i < 256 else 0xFF for i in (int(i) for i in ids))
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE (GPT-2 style) ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as EOD."""

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer):  # noqa: F821 - imported lazily
        eod = tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"the tokenizer has no {EOD_TOKEN!r} special token")
        self._tok = tokenizer
        self._eod = int(eod)
        # Text that happens to contain "<|endoftext|>" must stay text, not become a document break.
        self._tok.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including the special token."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eod_id(self) -> int:
        """Id of ``<|endoftext|>``."""
        return self._eod

    @property
    def backend(self) -> tokenizers.Tokenizer:  # noqa: F821 - imported lazily
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as a HuggingFace ``tokenizer.json``."""
        self._tok.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(os.fspath(path)))


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (including EOD) on ``texts``, locally."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_size = 256 + 1  # every byte plus EOD, so that any text is encodable
    if vocab_size < min_size:
        raise ConfigError("vocab_size", vocab_size, f"a byte-level BPE needs at least {min_size} ids; raise it")
    tok = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("trained byte-level BPE with %d ids", tok.get_vocab_size(with_added_tokens=True))
    return BPETokenizer(tok)


def load_tokenizer(dataset_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer named in ``<dataset_dir>/meta.json`` (``tokenizer.json`` beside it for bpe)."""
    directory = Path(dataset_dir)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ConfigError("data.path", str(directory), f"{meta_path} is missing; run `trainrun-prepare` "
                          "to write a dataset directory") from None
    kind = meta.get("tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError("data.path", str(directory), f"{path} is missing; rerun `trainrun-prepare`")
        return BPETokenizer.load(path)
    raise ConfigError("data.path", str(directory), f"meta.json names unknown tokenizer {kind!r} "
                      "(expected 'byte' or 'bpe'); rerun `trainrun-prepare`")
