"""Datasets are checked, not trusted: corrupt .bin/.idx pairs, out-of-vocabulary ids and bad
``trainrun-prepare`` inputs each give one line naming the file (exit status 2), never a crash later.

Every case builds a real dataset with the project's own writers and then corrupts it on disk.
"""

from __future__ import annotations

import json
import logging
import mmap
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import TINY, run_cli
from trainrun.data import checks
from trainrun.data.datasets import open_dataset_dir
from trainrun.data.indexed import HEADER_SIZE, DataFileError, IndexedDataset, IndexedDatasetWriter
from trainrun.data.layout import DatasetDirWriter
from trainrun.data.prepare import main as prepare_main
from trainrun.data.tokenizer import ByteTokenizer
from trainrun.errors import DataError

# ---------------------------------------------------------------- helpers


def _pair(tmp_path: Path, dtype: type = np.uint16, sizes: tuple[int, ...] = (5, 3, 0, 7)) -> Path:
    """A real .bin/.idx pair of documents with ``sizes`` tokens; returns its prefix."""
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, dtype) as w:
        for i, n in enumerate(sizes):
            w.add_document(np.arange(n) + i)
    return prefix


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _dataset_dir(tmp_path: Path, tokenizer=None, docs: int = 8) -> Path:
    """A real dataset directory (train 6 documents, val 2) as trainrun-prepare writes it."""
    directory = tmp_path / "data"
    directory.mkdir()
    with DatasetDirWriter(directory, tokenizer or ByteTokenizer(), "byte") as w:
        for i in range(docs):
            w.add("val" if i % 4 == 0 else "train", np.frombuffer((f"document {i} " * 20).encode(), np.uint8))
        w.finish(source="test")
    return directory


def _meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def _set_meta(directory: Path, **changes) -> None:
    meta = _meta(directory)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (directory / "meta.json").write_text(json.dumps(meta))


def _raises_naming(path: Path, match: str, call, *args, **kwargs) -> DataFileError:
    """``call`` raises a DataFileError (a DataError: exit status 2) on one line naming ``path``."""
    with pytest.raises(DataFileError, match=match) as err:
        call(*args, **kwargs)
    assert isinstance(err.value, DataError) and err.value.path == path
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    return err.value


# ---------------------------------------------------------------- .bin / .idx structure


def test_bin_longer_or_shorter_than_the_index_names_the_bin(tmp_path: Path) -> None:
    prefix = _pair(tmp_path)
    bin_path = prefix.with_suffix(".bin")
    good = bin_path.read_bytes()
    bin_path.write_bytes(good + b"\x01\x00")
    _raises_naming(bin_path, "is 32 bytes but ds.idx describes 30 .*2 bytes more", IndexedDataset, prefix)
    bin_path.write_bytes(good[:-4])
    _raises_naming(bin_path, "is 26 bytes but ds.idx describes 30 .*truncated", IndexedDataset, prefix)
    bin_path.write_bytes(good)
    assert IndexedDataset(prefix).num_tokens == 15


@pytest.mark.parametrize(("code", "name"), [(6, "float64"), (7, "float32")])
def test_float_dtype_code_is_refused(tmp_path: Path, code: int, name: str) -> None:
    prefix = _pair(tmp_path, np.int32)
    _patch(prefix.with_suffix(".idx"), 17, struct.pack("<B", code))
    err = _raises_naming(prefix.with_suffix(".idx"), f"dtype code {code} \\({name}\\).*integer", IndexedDataset, prefix)
    assert "trainrun-prepare" in err.fix
    with pytest.raises(ValueError, match="integers"):
        IndexedDatasetWriter(tmp_path / "f", np.float32)


@pytest.mark.parametrize(("offset", "count"), [(18, 2**40), (18, 5), (26, 2**40), (26, 4)])
def test_counts_that_do_not_fit_the_index_size(tmp_path: Path, offset: int, count: int) -> None:
    prefix = _pair(tmp_path)
    _patch(prefix.with_suffix(".idx"), offset, struct.pack("<Q", count))
    _raises_naming(prefix.with_suffix(".idx"), "header's counts .* need", IndexedDataset, prefix)


def test_truncated_header_and_bad_doc_idx_sizes_pointers(tmp_path: Path) -> None:
    prefix = _pair(tmp_path)
    idx = prefix.with_suffix(".idx")
    good = idx.read_bytes()
    n = 4  # sequences
    sizes_at, pointers_at, doc_idx_at = HEADER_SIZE, HEADER_SIZE + 4 * n, HEADER_SIZE + 12 * n
    cases = [
        (good[:20], "shorter than the 34-byte header"),
        (b"", "is 0 bytes"),
        (good[:doc_idx_at + 8 * n] + struct.pack("<q", 3), "doc_idx runs from 0 to 3, expected .* 0 to 4"),
        (good[:doc_idx_at + 16] + struct.pack("<q", 0) + good[doc_idx_at + 24:], "doc_idx decreases at entry 2"),
        (good[:sizes_at] + struct.pack("<i", -5) + good[sizes_at + 4:], "sequence 0 has negative size -5"),
        (good[:pointers_at + 8] + struct.pack("<q", 11) + good[pointers_at + 16:], "sequence 1 starts at byte 11"),
    ]
    for data, match in cases:
        idx.write_bytes(data)
        _raises_naming(idx, match, IndexedDataset, prefix)


def test_index_is_memory_mapped_not_copied(tmp_path: Path) -> None:
    ds = IndexedDataset(_pair(tmp_path))
    for arr in (ds.sizes, ds.pointers, ds.doc_idx):
        assert not arr.flags.owndata and not arr.flags.writeable
        base = arr
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.base if isinstance(base, np.ndarray) else base.obj
        assert isinstance(base, mmap.mmap)  # a view of the shared mapping, not a private copy
    assert isinstance(ds.tokens, np.memmap)
    np.testing.assert_array_equal(ds.sizes, [5, 3, 0, 7])
    np.testing.assert_array_equal(ds[3], np.arange(7) + 3)
    # pickled by path (a spawned worker re-maps the files instead of receiving copies)
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 300 and clone.num_tokens == ds.num_tokens


def test_writer_refuses_negative_ids_and_records_the_largest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative token id -2"), IndexedDatasetWriter(tmp_path / "a", np.int32) as w:
        w.add_document(np.array([1, -2, 3]))
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as w:
        assert w.max_token_id is None
        w.add_document([4, 9, 2])
        w.add_document([])
        w.add_document([7])
    assert w.max_token_id == 9


# ---------------------------------------------------------------- dataset directory: meta and vocabulary


def test_prepared_directory_records_max_token_id_and_opens(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path)
    meta = _meta(directory)
    ds = open_dataset_dir(directory)
    assert meta["max_token_id"] == {"train": 256, "val": 256}  # EOD is the largest byte-tokenizer id
    assert ds.max_token_id == 256 < ds.vocab_size


def test_token_id_at_or_above_vocab_size_names_the_bin_and_document(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path)
    train_bin = directory / "train.bin"
    # In place, same size: only a scan of the tokens can see it.
    _patch(train_bin, 2 * 300, struct.pack("<H", 257))
    err = _raises_naming(train_bin, "token 257 at position 300 \\(document 1\\) is not below the vocab_size 257",
                         open_dataset_dir, directory)
    assert "device-side assert" in err.fix
    # Without a recorded maximum (a directory from before it existed) the scan still finds it.
    _set_meta(directory, max_token_id=None)
    _raises_naming(train_bin, "token 257 at position 300", open_dataset_dir, directory)


def test_recorded_max_token_id_is_checked_without_reading_big_files(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    directory = _dataset_dir(tmp_path)
    _set_meta(directory, max_token_id={"train": 300, "val": 256})
    _raises_naming(directory / "meta.json", "records max_token_id 300 for the train split, not below its "
                   "vocab_size 257", open_dataset_dir, directory)

    # A "big" split (every split, with the limit at 0) trusts a recorded maximum and reads no token...
    monkeypatch.setattr(checks, "SCAN_MAX_BYTES", 0)
    _set_meta(directory, max_token_id={"train": 256, "val": 256})
    _patch(directory / "train.bin", 0, struct.pack("<H", 999))
    assert open_dataset_dir(directory).max_token_id == 256
    # ... unless asked to verify everything,
    _raises_naming(directory / "train.bin", "token 999 at position 0 \\(document 0\\)", open_dataset_dir, directory,
                   verify_checksum=True)
    # ... or nothing recorded it: then it scans, and says how to avoid that next time.
    _set_meta(directory, max_token_id=None)
    with caplog.at_level(logging.WARNING, logger="trainrun.data.checks"):
        _raises_naming(directory / "train.bin", "token 999", open_dataset_dir, directory)
    assert "re-run trainrun-prepare" in caplog.text


def test_small_bin_changed_after_preparation_disagrees_with_meta(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path)
    _patch(directory / "val.bin", 0, struct.pack("<H", 255))  # still in vocabulary, but not what was written
    _set_meta(directory, max_token_id={"train": 256, "val": 200})
    _raises_naming(directory / "val.bin", "up to 256 but meta.json records max_token_id 200", open_dataset_dir,
                   directory)


class _WideTokenizer(ByteTokenizer):
    """Byte tokens but a vocabulary big enough for int32 storage, where a negative id can exist."""

    @property
    def vocab_size(self) -> int:
        return 70000


def test_negative_token_id_in_a_signed_file(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path, tokenizer=_WideTokenizer())
    assert _meta(directory)["dtype"] == "int32"
    _set_meta(directory, max_token_id=None)
    _patch(directory / "val.bin", 4 * 5, struct.pack("<i", -3))
    _raises_naming(directory / "val.bin", "token -3 at position 5 \\(document 0\\) is negative", open_dataset_dir,
                   directory)


def test_index_from_another_preparation_or_not_back_to_back(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path)
    meta = _meta(directory)
    _set_meta(directory, num_tokens={"train": meta["num_tokens"]["train"] + 1, "val": meta["num_tokens"]["val"]})
    _raises_naming(directory / "train.idx", "holds .* tokens but meta.json records", open_dataset_dir, directory)
    _set_meta(directory, num_tokens=meta["num_tokens"], dtype="int32")
    _raises_naming(directory / "train.idx", "stores uint16 tokens but meta.json says int32", open_dataset_dir,
                   directory)
    _set_meta(directory, dtype="uint16")
    # Swap the pointers of two equally long documents: every byte is still covered, but not in order.
    ds = IndexedDataset(directory / "val")
    assert ds.sizes[0] == ds.sizes[1]
    p0, p1 = (int(p) for p in ds.pointers[:2])
    del ds
    _patch(directory / "val.idx", HEADER_SIZE + 4 * 2, struct.pack("<qq", p1, p0))
    _raises_naming(directory / "val.idx", "sequence 0 does not start where", open_dataset_dir, directory)


@pytest.mark.parametrize(("changes", "match"), [
    ({"vocab_size": "257"}, "vocab_size '257', not a positive integer"),
    ({"eod_id": 257}, "eod_id 257, not an integer in \\[0, vocab_size=257\\)"),
    ({"max_token_id": [256, 256]}, "max_token_id \\[256, 256\\]"),
])
def test_malformed_meta_values_name_meta_json(tmp_path: Path, changes: dict, match: str) -> None:
    directory = _dataset_dir(tmp_path)
    _set_meta(directory, **changes)
    _raises_naming(directory / "meta.json", match, open_dataset_dir, directory)


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_reports_a_corrupt_bin_in_one_line_with_exit_2(tmp_path: Path) -> None:
    directory = _dataset_dir(tmp_path)
    with open(directory / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    proc = run_cli([*TINY, "data.name=indexed", f"data.path={directory}", "train.max_steps=1",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("trainrun:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"trainrun: data error: data.path='{directory / 'train.bin'}': is ")
    assert "2 bytes more than the index" in errors[0] and "trainrun-prepare" in errors[0]


# ---------------------------------------------------------------- trainrun-prepare inputs


def _jsonl(tmp_path: Path, third_line: bytes, name: str = "docs.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b'{"text": "first"}\n{"text": "second"}\n' + third_line + b'\n{"text": "fourth"}\n')
    return path


def _prepare_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run trainrun-prepare; assert exit status 2 with one line on stderr; return that line."""
    rc = prepare_main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("trainrun-prepare: error: ")
    return err.strip()


@pytest.mark.parametrize(("third_line", "match"), [
    (b'{"text": "caf\xe9"}', "not valid UTF-8 (byte 0xe9 at column 14)"),
    (b'{"text": "unterminated}', "invalid JSON: Unterminated string starting at column 10"),
    (b'{"body": "no text key"}', "no 'text' field (fields: 'body'); pass --text-key"),
    (b'{"text": ["a", "list"]}', "field 'text' is a JSON array, not a string"),
    (b'{"text": null}', "field 'text' is a JSON null, not a string"),
    (b'["not", "an", "object"]', "a JSON array, not an object"),
    (b'{"text": "lone \\ud800 surrogate"}', "unpaired surrogate '\\ud800' at character 5"),
])
def test_prepare_jsonl_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture, third_line: bytes,
                                                 match: str) -> None:
    path = _jsonl(tmp_path, third_line)
    for tokenizer in ("byte", "bpe"):  # bpe reads the documents first while training
        err = _prepare_error([str(path), "--output", str(tmp_path / "out"), "--tokenizer", tokenizer,
                              "--vocab-size", "300"], capsys)
        assert f"{path}:3" in err and match in err
        assert not (tmp_path / "out").exists()


def test_prepare_text_file_not_utf8_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine\n")
    (tmp_path / "in" / "b.txt").write_bytes(b"line one\nline \xff two\n")
    err = _prepare_error([str(tmp_path / "in"), "--output", str(tmp_path / "out")], capsys)
    assert f"{tmp_path / 'in' / 'b.txt'}:2: not valid UTF-8 (byte 0xff at column 6)" in err


def test_prepare_accepts_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n')
    assert prepare_main([str(path), "--output", str(tmp_path / "out"), "--val-fraction", "0.4"]) == 0


def _inputs(tmp_path: Path) -> tuple[Path, dict[Path, bytes]]:
    """An input directory with text files; returns it and a snapshot of every file in it."""
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / ("sub" if i % 2 else ".") / f"doc{i}.txt").write_text(f"text number {i}\n" * 10)
    return src, {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "parent_of_dir", "parent_of_file", "file"])
def test_force_never_deletes_an_input(tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    src, before = _inputs(tmp_path)
    inputs, output, relation = {
        "equal": ([src], src, "is the input"),
        "parent_of_dir": ([src / "sub"], src, "contains the input"),
        "parent_of_file": ([src / "doc0.txt", src / "sub" / "doc1.txt"], src, "contains the input"),
        "file": ([src / "doc0.txt", src / "doc2.txt"], src / "doc2.txt", "is the input"),
    }[where]
    for force in ([], ["--force"]):
        err = _prepare_error([*map(str, inputs), "--output", str(output), *force], capsys)
        assert f"--output {output} {relation}" in err and "choose an output directory" in err
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".*") if p.name.startswith(".corpus")]  # no leftovers


def test_force_refuses_to_replace_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, _ = _inputs(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    err = _prepare_error([str(src), "--output", str(target), "--force"], capsys)
    assert "is a file, not a directory" in err and target.read_text() == "keep me"


def test_output_inside_an_input_directory_is_not_read_back(tmp_path: Path) -> None:
    src, before = _inputs(tmp_path)
    out = src / "prepared"
    args = [str(src), "--output", str(out), "--val-fraction", "0.3"]
    assert prepare_main(args) == 0
    first = _meta(out)
    assert prepare_main([*args, "--force"]) == 0  # the first run's .bin files are not new "documents"
    assert _meta(out)["num_documents"] == first["num_documents"] and sum(first["num_documents"].values()) == 4
    assert all(p.read_bytes() == data for p, data in before.items())


def test_force_refuses_an_output_holding_a_symlinked_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, _ = _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("only copy\n" * 5)
    (src / "link.txt").symlink_to(out / "precious.txt")  # reached through the input directory
    err = _prepare_error([str(src), "--output", str(out), "--force"], capsys)
    assert f"--output {out} contains the input {out / 'precious.txt'}" in err
    assert (out / "precious.txt").read_text() == "only copy\n" * 5


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_prepare_line_numbers_follow_universal_newlines(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        newline: bytes) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(newline.join([b'{"text": "a"}', b"", b'{"text": 3}', b'{"text": "b"}']))
    err = _prepare_error([str(path), "--output", str(tmp_path / "out")], capsys)
    assert f"{path}:3: field 'text' is a JSON number" in err
