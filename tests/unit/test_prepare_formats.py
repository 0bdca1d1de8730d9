"""trainrun-prepare's input formats (trainrun.data.prepare_readers): every format gives the documents a plain
.jsonl of the same texts gives, and every problem is one line naming the file, the record and the fix."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from trainrun.data.datasets import open_dataset_dir
from trainrun.data.prepare import find_sources
from trainrun.data.prepare import main as prepare_main
from trainrun.data.prepare_readers import iter_documents

zstandard = pytest.importorskip("zstandard")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # save_to_disk's bars would mix into the captured stderr

DOCS = [f"document {i}: the quick brown fox ünïcode ✓ {'x' * (i % 7)}\nsecond line {i}" for i in range(40)]
DOCS[5] = ""  # an empty text: read like any other, never stored


def _jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    return "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def write_format(tmp_path: Path, kind: str, docs: list[str] = DOCS) -> Path:
    """``docs`` as one input of ``kind``; returns the path to give trainrun-prepare."""
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_bytes(_jsonl_bytes(docs))
    elif kind == "jsonl.gz":
        path = tmp_path / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl_bytes(docs)))
    elif kind == "jsonl.zst":
        path = tmp_path / "docs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(docs)))
    elif kind == "parquet":
        path = tmp_path / "docs.parquet"
        # small row groups: the reader must carry row numbers across record batches and row groups
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)
    elif kind == "dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(path))
    elif kind == "dataset_dict":
        path = tmp_path / "saved_dict"
        half = len(docs) // 2  # dataset_dict.json lists train first: read in that order
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:half]}),
                              "test": datasets.Dataset.from_dict({"text": docs[half:]})}).save_to_disk(str(path))
    elif kind == "text_dir":
        path = tmp_path / "texts"
        (path / "sub").mkdir(parents=True)
        for i, d in enumerate(docs):  # read in path order: texts/doc*.txt, then texts/sub/doc*.txt
            (path / ("sub" if i >= len(docs) // 2 else ".") / f"doc{i:03d}.txt").write_text(d)
    else:
        raise ValueError(kind)
    return path


KINDS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "dataset", "dataset_dict", "text_dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_the_same_documents_in_order(tmp_path: Path, kind: str) -> None:
    sources = find_sources([str(write_format(tmp_path, kind))])
    assert list(iter_documents(sources, "text")) == DOCS


def _documents(out: Path) -> list[tuple[int, ...]]:
    """Every stored document's tokens (both splits), sorted: the split depends on the location keys."""
    ds = open_dataset_dir(out, verify_checksum=True)
    return sorted(tuple(split[i].tolist()) for split in (ds.train, ds.val) for i in range(len(split)))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "jsonl"])
def test_every_format_stores_the_tokens_of_plain_jsonl(tmp_path: Path, kind: str) -> None:
    args = ["--val-fraction", "0.2", "--tokenizer", "byte"]
    assert prepare_main([str(write_format(tmp_path, "jsonl")), "--output", str(tmp_path / "plain"), *args]) == 0
    assert prepare_main([str(write_format(tmp_path, kind)), "--output", str(tmp_path / "other"), *args]) == 0
    expected = _documents(tmp_path / "plain")
    assert len(expected) == len(DOCS) - 1  # the empty document is not stored
    assert _documents(tmp_path / "other") == expected


def test_a_dataset_inside_an_input_directory_is_read_as_a_dataset(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_format(corpus, "dataset", DOCS[:10])
    (corpus / "notes.txt").write_text("a text file beside it")
    sources = find_sources([str(corpus)])
    assert [(s.path.name, s.kind) for s in sources] == [("notes.txt", "text"), ("saved", "dataset")]
    assert list(iter_documents(sources, "text")) == ["a text file beside it", *DOCS[:10]]  # no .arrow as text


# ---------------------------------------------------------------- errors: one line, the file and the record


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    rc = prepare_main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("trainrun-prepare: error: ")
    return err.strip()


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst"])
def test_compressed_jsonl_errors_name_the_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        kind: str) -> None:
    lines = _jsonl_bytes(DOCS).splitlines(keepends=True)
    lines[16] = b'{"body": "no text here"}\n'  # line 17
    raw = b"".join(lines)
    path = tmp_path / f"docs.{kind}"
    path.write_bytes(gzip.compress(raw) if kind == "jsonl.gz" else zstandard.ZstdCompressor().compress(raw))
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path}:17: no 'text' field (fields: 'body'); pass --text-key" in err
    assert not (tmp_path / "out").exists()


def test_a_zstd_file_of_several_frames_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.zst"
    raw = _jsonl_bytes(DOCS)
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(part) for part in (raw[:500], raw[500:])))
    assert list(iter_documents(find_sources([str(path)]), "text")) == DOCS  # `cat a.zst b.zst`, pzstd


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst"])
def test_a_damaged_compressed_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    good = write_format(tmp_path, kind).read_bytes()
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(good[: len(good) // 2])  # cut mid-stream, as an interrupted copy leaves it
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    what = "gzip" if kind == "jsonl.gz" else "zstd"
    assert f"{path}: not a readable {what} file" in err and "compress it again" in err


def test_a_parquet_null_text_names_its_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs: list[str | None] = list(DOCS)
    docs[9] = None  # row 9, in the second row group of 7
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=7)
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path}: row 9: 'text' is null, not a string; fill it or drop the row" in err


def test_a_parquet_column_that_is_not_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": list(range(10)), "body": [str(i) for i in range(10)]}), path)
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path}: row 0: column 'text' holds int64, not strings; pass --text-key" in err


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_a_missing_column_names_the_columns_present(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    kind: str) -> None:
    path = write_format(tmp_path, kind)
    err = _error([str(path), "--output", str(tmp_path / "out"), "--text-key", "content"], capsys)
    columns = "'id', 'text'" if kind == "parquet" else "'text', 'id'"
    assert f"{path}: no column 'content' (columns: {columns}); pass --text-key" in err
    # with the right key it reads
    assert prepare_main([str(path), "--output", str(tmp_path / "out"), "--text-key", "text"]) == 0


def test_a_dataset_dict_null_text_names_its_split_and_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:10]}),
                          "test": datasets.Dataset.from_dict({"text": ["ok", "fine", None, "more"]})
                          }).save_to_disk(str(path))
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path.resolve() / 'test'}: row 2: 'text' is null, not a string" in err


def test_a_damaged_parquet_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path}: not a readable Parquet file" in err


@pytest.mark.parametrize(("kind", "module", "package"), [
    ("parquet", "pyarrow", "pyarrow"), ("jsonl.zst", "zstandard", "zstandard"), ("dataset", "datasets", "datasets"),
])
def test_a_missing_library_is_one_line_with_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch, kind: str, module: str,
                                                      package: str) -> None:
    path = write_format(tmp_path, kind)
    monkeypatch.setitem(sys.modules, module, None)  # find_spec finds nothing, as without the package
    err = _error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"reading {path.name} needs {package}: pip install 'trainrun[prepare]'" in err


def test_formats_mix_in_one_run(tmp_path: Path) -> None:
    inputs = []
    for i, kind in enumerate(["jsonl.zst", "parquet", "dataset", "jsonl.gz"]):
        (tmp_path / kind).mkdir()
        inputs.append(write_format(tmp_path / kind, kind, DOCS[i * 10:(i + 1) * 10]))
    out = tmp_path / "out"
    assert prepare_main([*map(str, inputs), "--output", str(out), "--val-fraction", "0.2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["num_documents"].values()) == 39  # DOCS[5] is empty
    stored = np.concatenate([open_dataset_dir(out).train[i] for i in range(meta["num_documents"]["train"])])
    assert stored.size == meta["num_tokens"]["train"]
