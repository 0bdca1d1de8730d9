"""Tokenizers: raw UTF-8 bytes, a byte-level BPE trained locally with HuggingFace ``tokenizers``, or a
local Hugging Face fast tokenizer (``tokenizer.json``) given to ``trainrun-prepare --tokenizer``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from trainrun.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
"""End-of-document tokens looked for, in order, in a Hugging Face tokenizer that names no eos_token."""


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
    """A byte-level BPE (GPT-2 style) ``tokenizers.Tokenizer`` with ``<|endoftext|>`` (or ``eod_token``) as EOD."""

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer, eod_token: str = EOD_TOKEN):  # noqa: F821 - imported lazily
        eod = tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"the tokenizer has no {eod_token!r} special token")
        self._tok = tokenizer
        self._eod = int(eod)
        # Ids of a downloaded tokenizer may have holes: the embedding must cover the largest one.
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self._vocab_size = max(int(tokenizer.get_vocab_size(with_added_tokens=True)), max(ids, default=-1) + 1)
        # Text that happens to contain "<|endoftext|>" must stay text, not become a document break.
        self._tok.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including the special tokens (largest id + 1)."""
        return self._vocab_size

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


class HFFastTokenizer(BPETokenizer):
    """A local Hugging Face fast tokenizer (``tokenizer.json``) with its end-of-sequence token as EOD.

    Documents are encoded without the tokenizer's own special tokens (no BOS): EOD alone separates them.
    """

    name = "hf"

    @classmethod
    def from_source(cls, source: str | os.PathLike, eod_token: str | None = None) -> HFFastTokenizer:
        """Load ``source`` (a ``tokenizer.json`` or a directory holding one); EOD is ``eod_token``, else the
        ``eos_token`` of the directory's ``tokenizer_config.json``, else the first of EOD_CANDIDATES it has."""
        from tokenizers import Tokenizer as HFBackend

        path = Path(source).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ConfigError("--tokenizer", str(source), f"{file} does not exist; give a tokenizer.json or a Hugging "
                              "Face model directory holding one (slow, sentencepiece-only tokenizers are not read)")
        try:
            backend = HFBackend.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the Rust loader raises plain Exception for any bad file
            raise ConfigError("--tokenizer", str(source), f"{file} is not a tokenizers file ({err})") from None
        eod = eod_token or _configured_eos(file.parent) or next(
            (t for t in EOD_CANDIDATES if backend.token_to_id(t) is not None), None)
        if eod is None or backend.token_to_id(eod) is None:
            raise ConfigError("--eod-token", eod, f"{file} has no such token; pass --eod-token with the token that "
                              "ends a document (e.g. its eos token)")
        return cls(backend, eod)

    @classmethod
    def load(cls, path: str | os.PathLike, eod_id: int | None = None) -> HFFastTokenizer:
        """Load the ``tokenizer.json`` a dataset directory holds, with EOD at ``eod_id`` (from its meta.json)."""
        from tokenizers import Tokenizer as HFBackend

        backend = HFBackend.from_file(os.fspath(path))
        eod = backend.id_to_token(eod_id) if eod_id is not None else None
        if eod is None:
            raise ValueError(f"{path} has no token with the recorded eod_id {eod_id}")
        return cls(backend, eod)


def _configured_eos(directory: Path) -> str | None:
    """The ``eos_token`` of ``directory/tokenizer_config.json`` (a string or an AddedToken dict), if any."""
    try:
        eos = json.loads((directory / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return eos.get("content") if isinstance(eos, dict) else eos if isinstance(eos, str) else None


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
    """The tokenizer named in ``<dataset_dir>/meta.json`` (``tokenizer.json`` beside it for bpe and hf)."""
    directory = Path(dataset_dir)
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DataError("data.path", str(directory), f"{meta_path} is missing; run `trainrun-prepare` "
                        "to write a dataset directory") from None
    kind = meta.get("tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "hf"):
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise DataError("data.path", str(directory), f"{path} is missing; rerun `trainrun-prepare`")
        if kind == "bpe":
            return BPETokenizer.load(path)
        try:
            return HFFastTokenizer.load(path, meta.get("eod_id"))
        except ValueError as err:
            raise DataError("data.path", str(directory), f"{err}; rerun `trainrun-prepare`") from None
    raise DataError("data.path", str(directory), f"meta.json names unknown tokenizer {kind!r} "
                    "(expected 'byte', 'bpe' or 'hf'); rerun `trainrun-prepare`")
