"""``trainrun-prepare``: tokenize text, JSONL, Parquet or datasets inputs into a dataset directory (data.name=indexed).

Inputs are files or directories (searched recursively, hidden entries skipped), each read by its
kind (:mod:`trainrun.data.prepare_readers`): ``.jsonl``, ``.jsonl.gz`` and ``.jsonl.zst`` hold one
document per line (the ``--text-key`` field); ``.parquet`` files and directories written by
``datasets``' ``save_to_disk`` one per row (the ``--text-key`` column; every split of a
``DatasetDict``); any other file is one document. zstd, Parquet and ``datasets`` need the
``prepare`` extra. ``--tokenizer`` is ``byte``, ``bpe`` (trained here on the training split) or a
local Hugging Face fast tokenizer (a ``tokenizer.json``, or a model directory holding one), copied
into the dataset directory and recorded in ``meta.json`` as ``hf`` so that ``trainrun-export``
carries it along. ``--workers N`` tokenizes in N processes (:mod:`trainrun.data.prepare_encode`)
and writes the same bytes as one; on a terminal a progress bar shows documents, tokens and tokens/s.
Documents are split into train/val by a seeded hash of their location (path, and line for JSONL or
row for tables), so the split does not depend on the order of the inputs on the command line.

Bad input is reported as one line naming the file and record (``docs.jsonl:3: ...``,
``data.parquet: row 5: ...``) with exit status 2: a line that is not UTF-8, invalid JSON, a line
without the text field, a text that is not a string, binary data (a NUL byte), a damaged compressed
file, a missing column (the columns present are named), or inputs without any text. The output directory
follows :mod:`trainrun.outputs`: it may not be, or contain, any input (the ``--tokenizer``
directory included), a run or a checkpoint directory, and ``--force`` replaces only an earlier
``trainrun-prepare`` output. It may lie inside an input directory: files under it, and under any
other trainrun output found there, are skipped when reading.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from trainrun.data.layout import META_FILE, DatasetDirWriter
from trainrun.data.prepare_encode import Progress, chunked, encode_chunks, start_workers_early
from trainrun.data.prepare_readers import (
    PrepareError,
    Source,
    check_text,
    dataset_sources,
    document_keys,
    file_kind,
    is_dataset_dir,
    iter_documents,
    iter_records,
    require_library,
)
from trainrun.data.split import document_scores, validation_mask
from trainrun.data.tokenizer import ByteTokenizer, HFFastTokenizer, Tokenizer, train_bpe
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
__all__ = ["PrepareError", "Source", "build_parser", "find_sources", "main", "prepare"]


def find_sources(inputs: list[str], exclude: Path | None = None) -> list[Source]:
    """Expand files and directories to a sorted, de-duplicated list of sources, each with its kind.

    A directory is searched recursively (hidden entries skipped); a ``datasets`` ``save_to_disk``
    directory in it, or given itself, is one source per split, and its own files are not read as
    text. Files under ``exclude`` (the output directory, when it lies inside an input directory)
    and under any other trainrun output found in an input directory are skipped: they are an
    earlier run's output, not text. A source whose reading library is missing is refused here,
    before anything is read.
    """
    found: list[tuple[Path, Source]] = []  # (the directory walked into, the source)
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found.append((p.parent, Source(p, file_kind(p))))
        elif p.is_dir():
            outputs = _nested_outputs(p, exclude)
            datasets = _dataset_dirs(p, outputs)
            skipped = outputs + datasets
            entries = [(f, [Source(f, file_kind(f))]) for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts)
                       and not any(d in f.parents for d in skipped)]
            entries += [(d, dataset_sources(d)) for d in datasets]
            found.extend((path if src.kind == "dataset" else path.parent, src)
                         for path, srcs in sorted(entries, key=lambda e: e[0]) for src in srcs)
        else:
            raise PrepareError(f"input {item!r} does not exist")
    # Judged by the directory walked into, so a symlink into the output is still an input (and refused).
    unique = list(dict.fromkeys(Source(src.path.resolve(), src.kind) for walked, src in found
                                if exclude is None or not walked.resolve().is_relative_to(exclude)))
    if not unique:
        raise PrepareError("no input files found in " + ", ".join(map(repr, inputs)))
    for src in unique:
        require_library(src)
    return unique


def _dataset_dirs(directory: Path, outputs: list[Path]) -> list[Path]:
    """The ``save_to_disk`` directories in ``directory`` (itself included), outermost only: a DatasetDict's
    split directories belong to it. Hidden ones and those inside a trainrun output are left out."""
    markers = [*directory.rglob("dataset_dict.json"), *directory.rglob("state.json")]
    candidates = sorted({m.parent for m in markers if m.is_file() and is_dataset_dir(m.parent)
                         and not any(part.startswith(".") for part in m.parent.relative_to(directory).parts)
                         and not any(d == m.parent or d in m.parent.parents for d in outputs)})
    return [d for d in candidates if not any(c in d.parents for c in candidates)]


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


def check_has_text(sources: list[Source], keys: list[str]) -> None:
    """Refuse inputs that hold no text, or too few documents for a train and a validation split."""
    texts = [s for s in sources if s.kind == "text"]
    if not keys or (len(keys) == len(texts) and all(s.path.stat().st_size == 0 for s in texts)):
        # Text files always count as one document each, JSONL files one per non-blank line, tables one per row.
        if len(sources) == 1:
            src = sources[0]
            what = f"{src.path} " + ("has no non-blank lines" if src.jsonl else "has no rows" if src.rows
                                     else "is empty")
        else:
            what = f"all {len(sources)} input files are empty (or blank .jsonl, or tables without rows)"
        raise PrepareError(f"no text to tokenize: {what}; give files that hold text")
    if len(keys) < 2:
        raise PrepareError(f"found only 1 document ({keys[0]}), and a train and a validation split need at least 2; "
                           "give more files (each text file is one document) or a .jsonl with one document per "
                           "line")


def load_hf_tokenizer(source: str, eod_token: str | None) -> HFFastTokenizer:
    """``--tokenizer <tokenizer.json or HF dir>`` as a tokenizer; a PrepareError naming the problem otherwise."""
    try:
        return HFFastTokenizer.from_source(source, eod_token)
    except ConfigError as err:
        raise PrepareError(str(err)) from None


def _tokenize(sources: list[Source], text_key: str, directory: Path, tok: Tokenizer, kind: str, is_val: np.ndarray,
              workers: int, may_fork: bool, progress: bool | None, source: str) -> tuple[dict | None, np.ndarray]:
    """Tokenize every document into ``directory``'s splits as ``is_val`` assigns them.

    Returns ``(meta, has_text)``: the finished metadata, or None (nothing kept) when a split got no
    document, and which documents hold text (empty ones are not stored).
    """
    val = is_val.tolist()  # a Python list: indexed once per document below
    has_text = np.zeros(len(val), dtype=bool)
    start, index = time.perf_counter(), 0
    with DatasetDirWriter(directory, tok, kind) as writer, Progress(len(val), enabled=progress) as bar:
        # Chunks are encoded in order (in workers or here), so documents are stored in input order.
        for encoded in encode_chunks(chunked(iter_records(sources, text_key)), tok, text_key, workers, may_fork):
            for tokens, empty in encoded.documents():
                if not empty:  # an empty document would only be a lone EOD
                    writer.add("val" if val[index] else "train", tokens)
                    has_text[index] = True
                index += 1
            bar.update(len(encoded.lengths), int(encoded.lengths.sum()) + int((~encoded.empty).sum()))
        seconds = time.perf_counter() - start
        logger.info("tokenized %d documents, %d tokens in %.1f s (%.0f tokens/s, %d worker(s))",
                    index, bar.tokens, seconds, bar.tokens / max(seconds, 1e-9), workers)
        if writer.count("train") == 0 or writer.count("val") == 0:
            writer.abort()
            return None, has_text
        return writer.finish(source=source), has_text


def prepare(inputs: list[str], output: str, tokenizer: str = "byte", vocab_size: int = 8192,
            val_fraction: float = 0.02, seed: int = 0, text_key: str = "text", force: bool = False,
            eod_token: str | None = None, workers: int = 1, progress: bool | None = None) -> dict:
    """Tokenize ``inputs`` into the dataset directory ``output``; returns its metadata.

    ``tokenizer``: byte, bpe, or the path of a Hugging Face tokenizer (whose EOD is ``eod_token``,
    else its eos token). ``workers``: processes that tokenize (1: this one, using the tokenizer's
    own threads); the output is the same bytes for any number. ``progress``: show the bar (default:
    when stderr is a terminal).
    """
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
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
    # Reading Parquet or datasets starts Arrow's thread pool: then workers are not forked from this process.
    may_fork = not any(s.rows for s in sources)
    start_workers_early(workers, may_fork)
    check_output(out, given + [s.path for s in sources], force)
    for src in sources:
        check_text(src)
    keys = document_keys(sources, text_key)
    check_has_text(sources, keys)
    scores = document_scores(keys, seed)
    is_val = validation_mask(scores, val_fraction)

    if eod_token is not None and kind != "hf":
        raise PrepareError(f"--eod-token applies to a Hugging Face tokenizer (--tokenizer PATH), not {tokenizer}")
    if kind == "bpe" and vocab_size < 257:
        raise PrepareError(f"--vocab-size must be at least 257 for a byte-level BPE, got {vocab_size}")

    def make_tokenizer(is_val: np.ndarray) -> Tokenizer:
        if kind == "hf":
            return load_hf_tokenizer(tokenizer, eod_token)
        if kind == "bpe":  # trained on the training split only: validation text stays unseen
            return train_bpe((t for t, v in zip(iter_documents(sources, text_key), is_val, strict=True) if not v),
                             vocab_size)
        return ByteTokenizer()

    tok = make_tokenizer(is_val)
    source = (f"trainrun-prepare of {len(sources)} file(s): " + ", ".join(str(s.path) for s in sources[:5])
              + (" ..." if len(sources) > 5 else ""))
    with staged_output(out, PREPARE, {"inputs": [str(s.path) for s in sources[:20]]}) as tmp:
        meta, has_text = _tokenize(sources, text_key, tmp, tok, kind, is_val, workers, may_fork, progress, source)
        if meta is None:
            # Empty documents are not stored, and the scores left one split with none that holds text (a
            # small input): move a document with text into it and tokenize again.
            n_text = int(has_text.sum())
            if n_text == 0:
                raise PrepareError(f"no text to tokenize: all {len(keys)} documents are empty (e.g. JSONL "
                                   f"records with {text_key!r}: \"\"); give inputs that hold text")
            if n_text < 2:
                raise PrepareError(f"only 1 of {len(keys)} documents holds text, and a train and a validation "
                                   "split need at least 2; add inputs that hold text")
            is_val = validation_mask(scores, val_fraction, has_text)
            logger.info("a split held only empty documents; moved a document with text into it, tokenizing again")
            if kind == "bpe":
                tok = make_tokenizer(is_val)
            meta, _ = _tokenize(sources, text_key, tmp, tok, kind, is_val, workers, may_fork, progress, source)
            if meta is None:  # validation_mask keeps a document with text in each split: not reached
                raise PrepareError("a split came out empty; add inputs or change --val-fraction")
        if kind == "hf":  # where the tokenizer came from; its tokenizer.json is copied beside meta.json
            meta["tokenizer_source"] = str(Path(tokenizer).expanduser().resolve())
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``trainrun-prepare``."""
    p = argparse.ArgumentParser(prog="trainrun-prepare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    p.add_argument("inputs", nargs="+", help="text files, .jsonl, .jsonl.gz, .jsonl.zst or .parquet files, "
                   "directories of them, or directories written by datasets' save_to_disk")
    p.add_argument("--output", "-o", required=True, help="dataset directory to write (use as data.path)")
    p.add_argument("--tokenizer", default="byte", metavar="{byte,bpe,PATH}",
                   help="byte (vocab 257), bpe (trained here), or a local Hugging Face fast tokenizer: a "
                        "tokenizer.json or a model directory holding one")
    p.add_argument("--eod-token", default=None, help="token that ends each document, for --tokenizer PATH "
                   "(default: its tokenizer_config.json eos_token, else <|endoftext|>, </s>, ...)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size including EOD (bpe only)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="fraction of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--text-key", default="text",
                   help="JSONL field, or Parquet / datasets column, holding the document text")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that tokenize in parallel (1: this one, using the tokenizer's threads); "
                        "the output is the same bytes for any number")
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
        start = time.perf_counter()
        meta = prepare(args.inputs, args.output, args.tokenizer, args.vocab_size, args.val_fraction,
                       args.seed, args.text_key, args.force, args.eod_token, args.workers)
        seconds = time.perf_counter() - start
        docs, tokens = meta["num_documents"], meta["num_tokens"]
        return (f"wrote {args.output}: {docs['train'] + docs['val']} documents (train {docs['train']}, val "
                f"{docs['val']}), {tokens['train'] + tokens['val']} tokens (train {tokens['train']}, val "
                f"{tokens['val']}), {meta['tokenizer']} vocab {meta['vocab_size']}, checksum {meta['checksum']}, "
                f"in {seconds:.1f} s ({(tokens['train'] + tokens['val']) / max(seconds, 1e-9):,.0f} tokens/s)")

    return run_output_command("trainrun-prepare", run, (PrepareError, OutputError, OSError, UnicodeDecodeError))

if __name__ == "__main__":
    sys.exit(main())
