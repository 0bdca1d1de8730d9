"""The input formats of ``trainrun-prepare``: what each file is, its documents' keys and texts.

Each format is read through its own library, chosen by suffix (a directory by its contents):

==================  ==========================================  =====================================
input               one document is                             read with
==================  ==========================================  =====================================
``*.jsonl``         a non-blank line, field ``--text-key``       the standard library
``*.jsonl.gz``      the same, gzip-compressed                    :mod:`gzip`
``*.jsonl.zst``     the same, zstd-compressed                    ``zstandard`` (extra ``prepare``)
``*.parquet``       a row, column ``--text-key``                 ``pyarrow.parquet``, in record batches
``save_to_disk``    a row, column ``--text-key``                 ``datasets.load_from_disk``
directory
any other file      the whole file (UTF-8 text)                  the standard library
==================  ==========================================  =====================================

A directory written by ``datasets``' ``save_to_disk`` is recognised by its ``state.json`` and
``dataset_info.json`` (a ``Dataset``) or its ``dataset_dict.json`` (a ``DatasetDict``). Every split
of a ``DatasetDict`` is read, in the order ``dataset_dict.json`` lists them: trainrun-prepare makes
its own train/validation split, by a hash of each document's location, so a dataset's own splits
are just more documents.

Locations are ``file:line`` for the JSONL kinds (lines counted from 1, as editors do) and
``file: row N`` for Parquet and datasets (rows counted from 0, as ``table.slice(N)`` and ``ds[N]``
index them). Every problem is one :class:`PrepareError` line naming the file, the record and the fix.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from trainrun.extras import installed

SNIFF_BYTES = 1 << 16  # how much of each input is checked for binary data before anything is tokenized
BATCH_ROWS = 1024  # rows per Arrow record batch read from Parquet and datasets: bounded memory

JSONL_KINDS = ("jsonl", "jsonl.gz", "jsonl.zst")
KINDS = ("text", *JSONL_KINDS, "parquet", "dataset")
_SUFFIX_KINDS = ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"), (".parquet", "parquet"))
_LIBRARIES = {"jsonl.zst": ("zstandard", "zstandard"), "parquet": ("pyarrow", "pyarrow"),
              "dataset": ("datasets", "datasets")}
"""kind -> (module to import, package to install) for the kinds outside the standard library."""

DATASET_FILES = ("state.json", "dataset_info.json")
"""Files that make a directory one ``datasets`` ``Dataset`` written by ``save_to_disk``."""
DATASET_DICT_FILE = "dataset_dict.json"
"""The file that makes a directory a ``DatasetDict`` written by ``save_to_disk`` (one subdirectory per split)."""


class PrepareError(Exception):
    """A problem with the inputs or options; reported as one line and exit status 2."""


@dataclass(frozen=True)
class Source:
    """One input (a file, or a ``datasets`` directory of one split) and how it is read (one of :data:`KINDS`)."""

    path: Path
    kind: str

    @property
    def jsonl(self) -> bool:
        """Read line by line as JSON objects (plain or compressed)."""
        return self.kind in JSONL_KINDS

    @property
    def rows(self) -> bool:
        """Read as the rows of an Arrow table (Parquet or a ``datasets`` directory)."""
        return self.kind in ("parquet", "dataset")


def file_kind(path: Path) -> str:
    """The kind of an input file, from its suffix (case-insensitive); anything unknown is one text document."""
    name = path.name.lower()
    return next((kind for suffix, kind in _SUFFIX_KINDS if name.endswith(suffix)), "text")


def is_dataset_dir(directory: Path) -> bool:
    """``directory`` was written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return (directory / DATASET_DICT_FILE).is_file() or all((directory / f).is_file() for f in DATASET_FILES)


def dataset_sources(directory: Path) -> list[Source]:
    """The sources of a ``save_to_disk`` directory: itself (a ``Dataset``), or each split of a ``DatasetDict``
    in the order its ``dataset_dict.json`` lists them."""
    dict_file = directory / DATASET_DICT_FILE
    if not dict_file.is_file():
        return [Source(directory, "dataset")]
    try:
        splits = json.loads(dict_file.read_text())["splits"]
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise TypeError("'splits' is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrepareError(f"{dict_file}: not a datasets DatasetDict file ({err}); save the dataset again with "
                           "save_to_disk, or leave it out of the inputs") from None
    missing = [s for s in splits if not all((directory / s / f).is_file() for f in DATASET_FILES)]
    if missing:
        raise PrepareError(f"{directory}: split {missing[0]!r} listed in {DATASET_DICT_FILE} has no saved dataset "
                           f"({directory / missing[0] / DATASET_FILES[0]} is missing); save the dataset again")
    return [Source(directory / s, "dataset") for s in splits]


def require_library(src: Source) -> None:
    """Refuse a source whose reading library is not installed, in one line naming the file and the fix."""
    if src.kind in _LIBRARIES:
        module, package = _LIBRARIES[src.kind]
        if not installed(module):
            raise PrepareError(f"reading {src.path.name} needs {package}: pip install 'trainrun[prepare]'")


# ---------------------------------------------------------------- errors located in a file


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


def _read_errors(kind: str) -> tuple[type[BaseException], ...]:
    """What a decompressing reader of ``kind`` raises for a damaged file (plain files: nothing of its own)."""
    if kind == "jsonl.gz":
        return (OSError, EOFError, zlib.error)  # BadGzipFile is an OSError; a cut file is an EOFError
    if kind == "jsonl.zst":
        import zstandard

        return (zstandard.ZstdError, OSError, EOFError)
    return ()


def _damaged(src: Source, err: BaseException) -> PrepareError:
    what = "gzip" if src.kind == "jsonl.gz" else "zstd"
    return PrepareError(f"{src.path}: not a readable {what} file ({type(err).__name__}: {err}); "
                        "compress it again or leave it out of the inputs")


class _ZstdFile(io.RawIOBase):
    """The decompressed content of a ``.zst`` file, every frame of it, streamed.

    ``zstandard``'s own ``stream_reader`` stops after the first frame unless told otherwise and ends
    quietly where a cut file ends mid-frame; both would lose documents without a word. This reader
    continues across frames (``zstd`` of concatenated files, ``pzstd``) and raises ``EOFError`` for a
    file that ends inside one.
    """

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None
        self._pending = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            data = self._file.read(1 << 20)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame (cut short?)")
                return 0
            out = []
            while data:
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                out.append(self._frame.decompress(data))
                data = self._frame.unused_data if self._frame.eof else b""
            self._pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(src: Source) -> IO[bytes]:
    """The decompressed bytes of a text or JSONL source, as a buffered binary file (iterable by line)."""
    if src.kind == "jsonl.gz":
        return gzip.open(src.path, "rb")
    if src.kind == "jsonl.zst":
        return io.BufferedReader(_ZstdFile(src.path), buffer_size=1 << 20)  # streamed: memory stays bounded
    return open(src.path, "rb")


def check_text(src: Source) -> None:
    """Refuse a text or JSONL input that is binary or not UTF-8, judged by its first :data:`SNIFF_BYTES` bytes
    (decompressed, for the compressed kinds).

    Made for every input before anything is tokenized (or a BPE trained), so that a binary file is
    named at once rather than counted as a document; the readers check the rest of each file.
    Parquet and ``datasets`` inputs are checked by their schema instead (:func:`check_columns`).
    """
    if src.rows:
        check_columns(src, None)
        return
    try:
        with open_binary(src) as f:
            head = f.read(SNIFF_BYTES)
    except _read_errors(src.kind) as err:
        raise _damaged(src, err) from None
    nul = head.find(b"\0")
    if nul >= 0:
        raise _binary(src.path, head, nul)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as err:
        raise _undecodable(src.path, head, err) from None


# ---------------------------------------------------------------- JSONL (plain, gzip, zstd)


def jsonl_lines(src: Source) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of each non-blank line of a JSONL source, decompressed and decoded as UTF-8.

    Each line is decoded alone, so a bad byte is reported with its line rather than as an error
    somewhere in the file. Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (Python's universal newlines,
    as text-mode reading did before), so line numbers and split keys are unchanged.
    """
    path, n = src.path, 0
    try:
        with open_binary(src) as f:
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
    except _read_errors(src.kind) as err:
        raise _damaged(src, err) from None


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type (what the user sees in the file)."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_jsonl_line(path: Path | str, n: int, line: str, text_key: str) -> str:
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


# ---------------------------------------------------------------- Arrow tables (Parquet, datasets)


def _open_table(src: Source) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` or a ``datasets.Dataset`` for ``src``; a damaged one is a PrepareError."""
    try:
        if src.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(src.path)
        from datasets import Dataset, load_from_disk
        from datasets.utils import logging as datasets_logging

        # Its progress bars would come between trainrun-prepare's own lines (and break a one-line error).
        datasets_logging.disable_progress_bar()
        ds = load_from_disk(str(src.path))
        if not isinstance(ds, Dataset):  # a DatasetDict reached without its dataset_dict.json being seen
            raise ValueError(f"a {type(ds).__name__}, not one Dataset")
        return ds
    except PrepareError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise many kinds for a damaged file
        what = "a readable Parquet file" if src.kind == "parquet" else "a dataset saved by datasets' save_to_disk"
        raise PrepareError(f"{src.path}: not {what} ({type(err).__name__}: {err}); write it again or leave it out "
                           "of the inputs") from None


def _schema(table: Any) -> Any:
    """The Arrow schema of a ParquetFile or a Dataset."""
    return table.schema_arrow if hasattr(table, "schema_arrow") else table.data.schema


def check_columns(src: Source, table: Any | None, text_key: str | None = None) -> Any:
    """Open ``src`` (unless ``table`` is given) and, with ``text_key``, refuse a missing or non-string column.

    Returns the opened table. Made before anything is tokenized, from the schema alone.
    """
    table = table if table is not None else _open_table(src)
    if text_key is None:
        return table
    import pyarrow as pa

    schema = _schema(table)
    if text_key not in schema.names:
        raise PrepareError(f"{src.path}: no column {text_key!r} (columns: {', '.join(map(repr, schema.names[:12]))}); "
                           "pass --text-key with the column that holds the text")
    kind = schema.field(text_key).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise PrepareError(f"{src.path}: row 0: column {text_key!r} holds {kind}, not strings; pass --text-key with "
                           "the column that holds the text")
    return table


def _num_rows(table: Any) -> int:
    return table.metadata.num_rows if hasattr(table, "metadata") else table.num_rows


def _column_batches(table: Any, text_key: str) -> Iterator[Any]:
    """The ``text_key`` column in record batches of :data:`BATCH_ROWS` rows (Arrow arrays, in row order)."""
    if hasattr(table, "iter_batches"):  # Parquet: only this column is read from disk
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[text_key]):
            yield batch.column(0)
    else:  # a Dataset (memory-mapped Arrow); .iter() follows any indices mapping it carries
        for batch in table.select_columns([text_key]).with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield batch.column(0)


def table_texts(src: Source, text_key: str) -> Iterator[tuple[int, str]]:
    """``(row, text)`` of each row of a Parquet or ``datasets`` source; a null text names its row."""
    table = check_columns(src, None, text_key)
    row = 0
    for column in _column_batches(table, text_key):
        texts = column.to_pylist()
        if column.null_count:
            bad = row + texts.index(None)
            raise PrepareError(f"{src.path}: row {bad}: {text_key!r} is null, not a string; fill it or drop the "
                               "row")
        yield from enumerate(texts, start=row)
        row += len(texts)


# ---------------------------------------------------------------- every kind


def document_keys(sources: list[Source], text_key: str) -> list[str]:
    """A location key per document, in reading order (the train/validation split is decided from these).

    ``file:line`` for the JSONL kinds, ``file:row`` for tables (the row count comes from the metadata;
    the column is checked here, before anything is tokenized), the path for a text file.
    """
    keys: list[str] = []
    for src in sources:
        if src.jsonl:
            # jsonl_lines is iter_records' reader too, so keys and texts stay aligned.
            keys.extend(f"{src.path}:{n}" for n, _ in jsonl_lines(src))
        elif src.rows:
            keys.extend(f"{src.path}:{row}" for row in range(_num_rows(check_columns(src, None, text_key))))
        else:
            keys.append(str(src.path))
    return keys


def read_text_file(path: Path) -> str:
    """One text file as a document: UTF-8, universal newlines; binary data or a bad byte names its line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _undecodable(path, raw, err) from None
    if "\0" in text:  # past what check_text looked at
        raise _binary(path, raw, raw.find(b"\0"))
    # Universal newlines, exactly as the text-mode read_text() this replaces: same tokens.
    return text.replace("\r\n", "\n").replace("\r", "\n")


Record = tuple[str | None, int, str]
"""One document as read: ``(path, line, raw JSONL line)`` for the JSONL kinds, whose parsing is left to
whoever tokenizes it (a worker process, in parallel), else ``(None, location, text)``."""


def iter_records(sources: list[Source], text_key: str) -> Iterator[Record]:
    """Every document of ``sources`` as a :data:`Record`, in the order of :func:`document_keys` (empty ones
    included); :func:`record_text` turns one into its text."""
    for src in sources:
        if src.jsonl:
            path = str(src.path)  # one object for the whole file: pickled once per chunk
            for n, line in jsonl_lines(src):
                yield path, n, line
        elif src.rows:
            for row, text in table_texts(src, text_key):
                yield None, row, text
        else:
            yield None, 0, read_text_file(src.path)


def record_text(record: Record, text_key: str) -> str:
    """The text of one :data:`Record` (a JSONL line is parsed here; a problem names its ``file:line``)."""
    path, n, value = record
    return value if path is None else parse_jsonl_line(path, n, value, text_key)


def iter_documents(sources: list[Source], text_key: str) -> Iterator[str]:
    """Document texts, in the same order as :func:`document_keys` (empty ones included)."""
    for record in iter_records(sources, text_key):
        yield record_text(record, text_key)
