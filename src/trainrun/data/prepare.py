"""``trainrun-prepare``: tokenize text files or JSONL into a dataset directory for ``data.name=indexed``.

Inputs are files or directories (searched recursively, hidden entries skipped). A ``.jsonl`` file
holds one document per line (the ``--text-key`` field); any other file is one document.
``--tokenizer`` is ``byte``, ``bpe`` (trained here on the training split) or a local Hugging Face
fast tokenizer (a ``tokenizer.json``, or a model directory holding one), copied into the dataset
directory and recorded in ``meta.json`` as ``hf`` so that ``trainrun-export`` carries it along.
Documents are split into train/val by a seeded hash of their location (path, and line for JSONL),
so the split does not depend on the order of the inputs on the command line.

Bad input is reported as one line naming the file and line (``docs.jsonl:3: ...``) with exit
status 2: a line that is not UTF-8, invalid JSON, a line without the text field, a text that
is not a string, binary data (a NUL byte), or inputs without any text. The output directory
follows :mod:`trainrun.outputs`: it may not be, or contain, any input (the ``--tokenizer``
directory included), a run or a checkpoint directory, and ``--force`` replaces only an earlier
``trainrun-prepare`` output. It may lie inside an input directory: files under it, and under any
other trainrun output found there, are skipped when reading.
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainrun.data.layout import META_FILE, DatasetDirWriter
from trainrun.data.split import document_scores, validation_mask
from trainrun.data.tokenizer import BPETokenizer, ByteTokenizer, HFFastTokenizer, Tokenizer, train_bpe
from trainrun.errors import ConfigError
from trainrun.outputs import (
    MARKER_GLOB,
    OutputError,
    check_not_input,
    check_output_dir,
    run_output_command,
    staged_output,
)

logger = logging.getLogger(__name__)

PREPARE = "trainrun-prepare"  # the command name, which also names its output marker (.trainrun-prepare.json)
ENCODE_CHUNK = 256  # documents per encode_batch call: parallel in Rust, bounded memory
SNIFF_BYTES = 1 << 16  # how much of each input is checked for binary data before anything is tokenized


class PrepareError(Exception):
    """A problem with the inputs or options; reported as one line and exit status 2."""


@dataclass(frozen=True)
class Source:
    """One input file and how it is read."""

    path: Path
    jsonl: bool


def find_sources(inputs: list[str], exclude: Path | None = None) -> list[Source]:
    """Expand files and directories to a sorted, de-duplicated list of input files.

    Files under ``exclude`` (the output directory, when it lies inside an input directory) and
    under any other trainrun output found in an input directory are skipped: they are an earlier
    run's output, not text.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            outputs = _nested_outputs(p, exclude)
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                                and not any(d in f.parents for d in outputs)))
        else:
            raise PrepareError(f"input {item!r} does not exist")
    # Judged by the directory walked into, so a symlink into the output is still an input (and refused).
    unique = list(dict.fromkeys(f.resolve() for f in files
                                if exclude is None or not f.parent.resolve().is_relative_to(exclude)))
    if not unique:
        raise PrepareError("no input files found in " + ", ".join(map(repr, inputs)))
    return [Source(f, f.suffix.lower() == ".jsonl") for f in unique]


def _nested_outputs(directory: Path, exclude: Path | None) -> list[Path]:
    """Directories under ``directory`` that a trainrun command wrote (they hold its marker file), but not
    ``exclude``; each is reported, since its files are left out of the inputs."""
    found = sorted({m.parent for m in directory.rglob(MARKER_GLOB) if m.is_file()}
                   | {m.parent for m in directory.rglob(META_FILE) if _earlier_prepare_output(m.parent)})
    for d in found:
        if exclude is None or d.resolve() != exclude:
            logger.warning("skipping %s: it is an earlier trainrun output, not text", d)
    return found


def _earlier_prepare_output(directory: Path) -> bool:
    """A dataset directory that trainrun-prepare wrote before it marked its outputs (its meta.json says so)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("source", "")).startswith(f"{PREPARE} of ")


def check_output(output: Path, inputs: list[Path], force: bool = False) -> None:
    """Refuse an output that :mod:`trainrun.outputs` forbids: a file, an input or one holding an input, a run
    or checkpoint directory, or a non-empty directory that is not an earlier trainrun-prepare output (that
    one only with ``force``)."""
    try:
        check_output_dir(output, PREPARE, inputs=inputs, force=force, may_nest_in_inputs=True,
                         recognise=_earlier_prepare_output)
    except OutputError as err:
        raise PrepareError(str(err)) from None


def _universal_newlines(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _undecodable(path: Path, raw: bytes, err: UnicodeDecodeError, line: int | None = None) -> PrepareError:
    """The error for bytes that are not UTF-8, located as ``file:line`` (and the byte's column)."""
    line_start = max(raw.rfind(b"\n", 0, err.start), raw.rfind(b"\r", 0, err.start)) + 1
    if line is None:
        line = _universal_newlines(raw[: err.start]).count(b"\n") + 1
    return PrepareError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start - line_start + 1}); re-encode the file as UTF-8 or remove that line")


def _binary(path: Path, raw: bytes, offset: int, line: int | None = None) -> PrepareError:
    """The error for binary input: a NUL byte at ``offset`` of ``raw``, located as ``file:line``."""
    line_start = max(raw.rfind(b"\n", 0, offset), raw.rfind(b"\r", 0, offset)) + 1
    if line is None:
        line = _universal_newlines(raw[:offset]).count(b"\n") + 1
    return PrepareError(f"{path}:{line}: binary data (a NUL byte at column {offset - line_start + 1}), not text; "
                        "give UTF-8 text or JSONL files, and leave this one out of the inputs")


def check_text(src: Source) -> None:
    """Refuse a file that is binary or not UTF-8, judged by its first :data:`SNIFF_BYTES` bytes.

    Made for every input before anything is tokenized (or a BPE trained), so that a binary file is
    named at once rather than counted as a document; the readers check the rest of each file.
    """
    with open(src.path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise _binary(src.path, head, nul)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as err:
        raise _undecodable(src.path, head, err) from None


def check_has_text(sources: list[Source], keys: list[str]) -> None:
    """Refuse inputs that hold no text, or too few documents for a train and a validation split."""
    texts = [s for s in sources if not s.jsonl]
    if not keys or (len(keys) == len(texts) and all(s.path.stat().st_size == 0 for s in texts)):
        # Text files always count as one document each, JSONL files one per non-blank line.
        if len(sources) == 1:
            what = f"{sources[0].path} " + ("has no non-blank lines" if sources[0].jsonl else "is empty")
        else:
            what = f"all {len(sources)} input files are empty (or blank .jsonl)"
        raise PrepareError(f"no text to tokenize: {what}; give files that hold text")
    if len(keys) < 2:
        raise PrepareError(f"found only 1 document ({keys[0]}), and a train and a validation split need at least 2; "
                           "give more files (each text file is one document) or a .jsonl with one document per "
                           "line")


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a JSONL file, decoded as UTF-8.

    Each line is decoded alone, so a bad byte is reported with its line rather than as an error
    somewhere in the file. Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (Python's universal newlines,
    as text-mode reading did before), so line numbers and split keys are unchanged.
    """
    n = 0
    with open(path, "rb") as f:
        for chunk in f:
            parts = chunk.split(b"\r")
            if len(parts) > 1 and parts[-1] in (b"\n", b""):
                parts.pop()  # the rest of a "\r\n", or a final "\r": not a line of its own
            for raw in parts:
                n += 1
                if b"\0" in raw:  # JSON never holds a raw NUL: a binary file with a .jsonl name
                    raise _binary(path, raw, raw.find(b"\0"), n)
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: tolerate a leading BOM
                except UnicodeDecodeError as err:
                    raise _undecodable(path, raw, err, n) from None
                if line.strip():
                    yield n, line


def document_keys(sources: list[Source]) -> list[str]:
    """A location key per document, in reading order (the split is decided from these)."""
    keys: list[str] = []
    for src in sources:
        if src.jsonl:
            # jsonl_lines is iter_documents' reader too, so keys and texts stay aligned.
            keys.extend(f"{src.path}:{n}" for n, _ in jsonl_lines(src.path))
        else:
            keys.append(str(src.path))
    return keys


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (what the user sees in the file)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_jsonl_line(path: Path, n: int, line: str, text_key: str) -> str:
    """The ``text_key`` string of one JSONL line; any problem is a PrepareError naming ``path:n``."""
    try:
        record = json.loads(line.rstrip("\r\n"))  # the line break is not part of the record
    except json.JSONDecodeError as err:
        raise PrepareError(f"{path}:{n}: invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}; "
                           "fix or remove the line") from None
    if not isinstance(record, dict):
        raise PrepareError(f"{path}:{n}: a JSON {_json_type(record)}, not an object; each line must be an object "
                           f"with a {text_key!r} field")
    if text_key not in record:
        raise PrepareError(f"{path}:{n}: no {text_key!r} field (fields: {', '.join(map(repr, list(record)[:8]))}); "
                           "pass --text-key with the field that holds the text")
    text = record[text_key]
    if not isinstance(text, str):
        raise PrepareError(f"{path}:{n}: field {text_key!r} is a JSON {_json_type(text)}, not a string; "
                           "make it a string or pass --text-key with the field that holds the text")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone "\udXXX" escape: valid JSON, but not text
            raise PrepareError(f"{path}:{n}: field {text_key!r} holds an unpaired surrogate "
                               f"{text[err.start]!a} at character {err.start}, which is not text; fix the "
                               "line's \\u escapes") from None
    return text


def iter_documents(sources: list[Source], text_key: str) -> Iterator[str]:
    """Document texts, in the same order as :func:`document_keys` (empty ones included)."""
    for src in sources:
        if not src.jsonl:
            raw = src.path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _undecodable(src.path, raw, err) from None
            if "\0" in text:  # past what check_text looked at
                raise _binary(src.path, raw, raw.find(b"\0"))
            # Universal newlines, exactly as the text-mode read_text() this replaces: same tokens.
            yield text.replace("\r\n", "\n").replace("\r", "\n")
            continue
        for n, line in jsonl_lines(src.path):
            yield parse_jsonl_line(src.path, n, line, text_key)


def _progress(iterable, total: int, desc: str):
    """Wrap with a tqdm bar on an interactive terminal only (logs and CI stay clean)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="doc", file=sys.stderr)


def _chunks(items: Iterator[tuple[str, bool]], size: int) -> Iterator[list[tuple[str, bool]]]:
    chunk: list[tuple[str, bool]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_hf_tokenizer(source: str, eod_token: str | None) -> HFFastTokenizer:
    """``--tokenizer <tokenizer.json or HF dir>`` as a tokenizer; a PrepareError naming the problem otherwise."""
    try:
        return HFFastTokenizer.from_source(source, eod_token)
    except ConfigError as err:
        raise PrepareError(str(err)) from None


def prepare(inputs: list[str], output: str, tokenizer: str = "byte", vocab_size: int = 8192,
            val_fraction: float = 0.02, seed: int = 0, text_key: str = "text", force: bool = False,
            eod_token: str | None = None) -> dict:
    """Tokenize ``inputs`` into the dataset directory ``output``; returns its metadata.

    ``tokenizer``: byte, bpe, or the path of a Hugging Face tokenizer (whose EOD is ``eod_token``,
    else its eos token).
    """
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    out = Path(output)
    kind = tokenizer if tokenizer in ("byte", "bpe") else "hf"
    given = [Path(i) for i in inputs] + ([Path(tokenizer).expanduser()] if kind == "hf" else [])
    # The inputs as given, before find_sources could skip an output that is an input; then the whole
    # rule on the files found (symlinks resolved), so no "pass --force" hint comes before either.
    try:
        check_not_input(out, PREPARE, given, may_nest_in_inputs=True)
    except OutputError as err:
        raise PrepareError(str(err)) from None
    sources = find_sources(inputs, exclude=out.resolve())
    check_output(out, given + [s.path for s in sources], force)
    for src in sources:
        check_text(src)
    keys = document_keys(sources)
    check_has_text(sources, keys)
    is_val = validation_mask(document_scores(keys, seed), val_fraction)

    tok: Tokenizer
    if eod_token is not None and kind != "hf":
        raise PrepareError(f"--eod-token applies to a Hugging Face tokenizer (--tokenizer PATH), not {tokenizer}")
    if kind == "hf":
        tok = load_hf_tokenizer(tokenizer, eod_token)
    elif tokenizer == "bpe":
        if vocab_size < 257:
            raise PrepareError(f"--vocab-size must be at least 257 for a byte-level BPE, got {vocab_size}")
        train_texts = (t for t, v in zip(iter_documents(sources, text_key), is_val, strict=True) if not v)
        tok = train_bpe(train_texts, vocab_size)
    else:
        tok = ByteTokenizer()

    docs = zip(iter_documents(sources, text_key), is_val, strict=True)
    with (staged_output(out, PREPARE, {"inputs": [str(s.path) for s in sources[:20]]}) as tmp,
          DatasetDirWriter(tmp, tok, kind) as writer):
        for chunk in _chunks(_progress(docs, len(keys), "tokenizing"), ENCODE_CHUNK):
            texts = [t for t, _ in chunk]
            ids = tok.encode_batch(texts) if isinstance(tok, BPETokenizer) else [tok.encode(t) for t in texts]
            for tokens, (text, v) in zip(ids, chunk, strict=True):
                if text:  # an empty document would only be a lone EOD
                    writer.add("val" if v else "train", np.asarray(tokens, dtype=writer.dtype))
        if writer.count("train") + writer.count("val") == 0:
            raise PrepareError(f"no text to tokenize: all {len(keys)} documents are empty (e.g. JSONL records "
                               f"with {text_key!r}: \"\"); give inputs that hold text")
        if writer.count("train") == 0 or writer.count("val") == 0:
            raise PrepareError("a split came out empty (documents without text?); "
                               "add inputs or change --val-fraction")
        meta = writer.finish(source=f"trainrun-prepare of {len(sources)} file(s): "
                                    + ", ".join(str(s.path) for s in sources[:5])
                                    + (" ..." if len(sources) > 5 else ""))
        if kind == "hf":  # where the tokenizer came from; its tokenizer.json is copied beside meta.json
            meta["tokenizer_source"] = str(Path(tokenizer).expanduser().resolve())
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``trainrun-prepare``."""
    p = argparse.ArgumentParser(prog="trainrun-prepare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    p.add_argument("inputs", nargs="+", help="text files, directories or .jsonl files")
    p.add_argument("--output", "-o", required=True, help="dataset directory to write (use as data.path)")
    p.add_argument("--tokenizer", default="byte", metavar="{byte,bpe,PATH}",
                   help="byte (vocab 257), bpe (trained here), or a local Hugging Face fast tokenizer: a "
                        "tokenizer.json or a model directory holding one")
    p.add_argument("--eod-token", default=None, help="token that ends each document, for --tokenizer PATH "
                   "(default: its tokenizer_config.json eos_token, else <|endoftext|>, </s>, ...)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size including EOD (bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document text")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier trainrun-prepare output (never an input, a run or a checkpoint directory, "
                        "or a directory this command did not write)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trainrun-prepare``; returns the exit status (2 for bad inputs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its one-line error (or --help)
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    def run() -> str:
        meta = prepare(args.inputs, args.output, args.tokenizer, args.vocab_size, args.val_fraction,
                       args.seed, args.text_key, args.force, args.eod_token)
        docs, tokens = meta["num_documents"], meta["num_tokens"]
        return (f"wrote {args.output}: {docs['train'] + docs['val']} documents (train {docs['train']}, val "
                f"{docs['val']}), {tokens['train'] + tokens['val']} tokens (train {tokens['train']}, val "
                f"{tokens['val']}), {meta['tokenizer']} vocab {meta['vocab_size']}, checksum {meta['checksum']}")

    return run_output_command("trainrun-prepare", run, (PrepareError, OutputError, OSError, UnicodeDecodeError))

if __name__ == "__main__":
    sys.exit(main())
