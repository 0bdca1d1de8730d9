"""The tokenizer files of an export: what ``AutoTokenizer.from_pretrained`` loads, offline.

The data's tokenizer goes out as a fast tokenizer (``tokenizer.json``) with a
``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, so that transformers uses it as is
rather than a model-specific class that would add its own BOS/EOS handling. Byte data gets a
byte-level BPE without merges whose ids are exactly the bytes (0..255) and ``<|endoftext|>`` = 256,
as trainrun's ``ByteTokenizer``. The data was tokenized without special tokens, so the exported
tokenizer adds none either (its post-processor is dropped).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from trainrun.config.blend import parse_blend
from trainrun.data.layout import read_meta
from trainrun.data.tokenizer import EOD_TOKEN, TOKENIZER_FILE
from trainrun.hf.mapping import ExportError

logger = logging.getLogger(__name__)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ``ByteLevel`` pre-tokenization uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control and whitespace bytes move above 255 so every byte has a visible character
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer():
    """A ``tokenizers.Tokenizer`` mapping text to its UTF-8 bytes (ids 0..255) plus ``<|endoftext|>`` = 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: every byte of the text becomes exactly one token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True, normalized=False)])
    assert tok.token_to_id(EOD_TOKEN) == 256
    return tok


@dataclass
class TokenizerSource:
    """The data's tokenizer as recorded by its dataset directory."""

    kind: str
    """byte, bpe or hf (see ``trainrun.data.tokenizer``)."""
    vocab_size: int
    eod_id: int
    directory: Path | None
    """Dataset directory holding tokenizer.json (None for the bundled byte corpus)."""


def find_tokenizer(data_cfg: dict, data_dir: str | None, data_checksum: str | None) -> TokenizerSource:
    """The tokenizer of the data a checkpoint trained on: ``data_dir`` if given, else from its data config (for a
    blend, its first source: every source of a blend shares one tokenizer)."""
    if data_cfg.get("blend") is not None:
        first = parse_blend(data_cfg["blend"], "data.blend")[0]  # type: ignore[index]
        data_cfg = {"name": first.dataset, "path": first.path if first.path is not None else data_cfg.get("path")}
        data_checksum = None  # the run's checksum covers the whole blend, not this one directory
    if data_dir is None and data_cfg.get("name") == "stdlib":
        return TokenizerSource("byte", 257, 256, None)  # the bundled corpus is always bytes
    directory = data_dir or (data_cfg.get("path") if data_cfg.get("name") == "indexed" else None)
    if directory is None:
        raise ExportError(f"cannot tell the tokenizer of data.name={data_cfg.get('name')!r}; pass --data <dataset "
                          "dir> (with meta.json) or --no-tokenizer")
    try:
        meta = read_meta(directory, field="--data")
    except ValueError as err:  # ConfigError, DataFileError
        raise ExportError(f"the training data's tokenizer is unavailable ({err}); pass --data <dataset dir> or "
                          "--no-tokenizer") from None
    if data_checksum and meta.get("checksum") != data_checksum:
        logger.warning("%s is not the data the checkpoint trained on (checksum %s, checkpoint %s); exporting its "
                       "tokenizer anyway", directory, str(meta.get("checksum"))[:12], data_checksum[:12])
    kind = meta["tokenizer"]
    if kind not in ("byte", "bpe", "hf"):
        raise ExportError(f"{directory}/meta.json names tokenizer {kind!r}, which trainrun-export does not know")
    if kind != "byte" and not (Path(directory) / TOKENIZER_FILE).is_file():
        raise ExportError(f"{directory}/{TOKENIZER_FILE} is missing; pass --data <dataset dir> or --no-tokenizer")
    return TokenizerSource(kind, int(meta["vocab_size"]), int(meta["eod_id"]), Path(directory))


def write_tokenizer(source: TokenizerSource, output: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for ``source`` into ``output``."""
    from tokenizers import Tokenizer

    if source.kind == "byte":
        tok = byte_level_tokenizer()
    else:
        tok = Tokenizer.from_file(str(source.directory / TOKENIZER_FILE))
        tok.post_processor = None
    eod = tok.id_to_token(source.eod_id)
    if eod is None:
        raise ExportError(f"the tokenizer has no token with the data's eod_id {source.eod_id}")
    tok.save(str(output / TOKENIZER_FILE))
    special = {"bos_token": eod, "eos_token": eod}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, **special}
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
