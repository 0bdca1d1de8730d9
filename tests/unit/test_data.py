"""Unit tests of trainrun.data: indexed format, corpus, loader and the prepare CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainrun.config.schema import DataConfig
from trainrun.data.corpus import build_stdlib_corpus
from trainrun.data.datasets import build_indexed, open_dataset_dir
from trainrun.data.indexed import IndexedDataset, IndexedDatasetWriter
from trainrun.data.loader import (
    BatchIterator,
    EvalSet,
    SampleStream,
    build_train_iterator,
)
from trainrun.data.prepare import main as prepare_main
from trainrun.data.sources import SplitView, open_sources
from trainrun.data.tokenizer import ByteTokenizer
from trainrun.errors import ConfigError, DataError
from trainrun.registry import DATASETS

# ---------------------------------------------------------------- indexed format


def _docs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (5, 1, 17, 0, 9)]


def test_idx_byte_layout_and_round_trip(tmp_path: Path) -> None:
    docs = _docs()
    prefix = tmp_path / "ds"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)

    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, len(docs), len(docs) + 1)  # 8 = Megatron's uint16
    off = 9 + 8 + 1 + 8 + 8
    sizes = struct.unpack_from(f"<{n_seq}i", raw, off)
    off += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", raw, off)
    off += 8 * n_seq
    doc_idx = struct.unpack_from(f"<{n_doc}q", raw, off)
    off += 8 * n_doc
    assert off == len(raw)
    assert list(sizes) == [len(d) for d in docs]
    assert list(pointers) == [0, 10, 12, 46, 46]  # byte offsets: 2 bytes per uint16 token
    assert list(doc_idx) == list(range(len(docs) + 1))
    assert (tmp_path / "ds.bin").read_bytes() == b"".join(d.tobytes() for d in docs)
    assert not list(tmp_path.glob("*.tmp-*"))

    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype == np.uint16 and ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.get(2, offset=3, length=4), docs[2][3:7])
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])


def test_writer_crash_leaves_no_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
        w.add_document(np.arange(4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_magic_and_missing_files_raise_data_error(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "ds", np.int32) as w:
        w.add_document(np.arange(3))
    idx = tmp_path / "ds.idx"
    idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:])
    with pytest.raises(DataError) as err:
        IndexedDataset(tmp_path / "ds")
    assert err.value.field == "data.path" and "magic" in err.value.fix
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(tmp_path / "nothing")


# ---------------------------------------------------------------- bundled corpus


def test_stdlib_corpus_deterministic_and_disjoint(tmp_path: Path) -> None:
    first = build_stdlib_corpus(tmp_path / "a", val_fraction=0.05, max_documents=200)
    second = build_stdlib_corpus(tmp_path / "b", val_fraction=0.05, max_documents=200)
    ds1, ds2 = open_dataset_dir(first), open_dataset_dir(second)
    assert ds1.checksum == ds2.checksum
    assert ds1.checksum == open_dataset_dir(first, verify_checksum=True).checksum
    assert len(ds1.train) + len(ds1.val) == 200 and len(ds1.val) >= 1
    assert isinstance(ds1.tokenizer, ByteTokenizer) and ds1.vocab_size == 257 and ds1.eod_id == 256

    def contents(split: IndexedDataset) -> set[bytes]:
        return {split[i].tobytes() for i in range(len(split))}

    assert contents(ds1.train).isdisjoint(contents(ds1.val))
    doc = ds1.train[0]
    assert doc[-1] == ds1.eod_id and (doc[:-1] < 256).all()
    text = ds1.tokenizer.decode(ds1.train[1][:-1].tolist())
    compile(text, "<stdlib>", "exec")  # real Python source, byte-exact
    # Built once: a second call returns the cached directory untouched.
    assert build_stdlib_corpus(tmp_path / "a", val_fraction=0.05, max_documents=200) == first


def test_stdlib_registry_factory(tmp_path: Path) -> None:
    cfg = DataConfig(name="stdlib", path=str(tmp_path), max_documents=20)
    ds = DATASETS._factories["stdlib"](cfg)  # no load_plugins(): only this module's registration
    assert ds.train.num_tokens > 0 and ds.path.parent == tmp_path
    with pytest.raises(ConfigError, match="data.val_fraction"):
        DataConfig(val_fraction=1.5).validate()


def test_indexed_factory_needs_path(tmp_path: Path) -> None:
    for path in (None, str(tmp_path / "missing")):
        with pytest.raises(ConfigError) as err:
            build_indexed(DataConfig(name="indexed", path=path))
        assert err.value.field == "data.path" and "trainrun-prepare" in err.value.fix


# ---------------------------------------------------------------- loader


def _stream(n_tokens: int = 1000, seq_len: int = 8, seed: int = 7) -> SampleStream:
    return SampleStream(np.arange(n_tokens, dtype=np.uint16), seq_len, seed=seed)


def test_windows_overlap_by_one_token() -> None:
    s = _stream()
    assert s.num_samples == (1000 - 1) // 8
    np.testing.assert_array_equal(s.window(3), np.arange(24, 33))
    x, y = s.batch([0, 1, 5])
    assert x.dtype == torch.int64 and x.shape == (3, 8) and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the last target of a window is the first input of the next one
    xs, ys = s.batch([0, 1], window_indices=True)
    assert ys[0, -1] == xs[1, 0]


def test_resume_mid_epoch_gives_same_batches() -> None:
    it = BatchIterator(_stream(), micro_batch_size=4)
    for _ in range(5):
        next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = BatchIterator(_stream(), micro_batch_size=4)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(resumed) for _ in range(3)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(_stream(seed=8), micro_batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        BatchIterator(_stream(seq_len=9), micro_batch_size=4).load_state_dict(state)


def test_data_parallel_ranks_cover_the_same_global_batch() -> None:
    single = BatchIterator(_stream(), micro_batch_size=6)
    ranks = [BatchIterator(_stream(), micro_batch_size=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(4):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert single.consumed_samples == ranks[0].consumed_samples == ranks[1].consumed_samples == 24


def test_epoch_wrap_reshuffles_and_covers_every_sample() -> None:
    s = _stream(n_tokens=81, seq_len=8)  # 10 samples per epoch
    it = BatchIterator(s, micro_batch_size=4)
    rows = torch.cat([next(it)[0] for _ in range(5)])  # 20 samples = 2 epochs, batch 3 straddles
    firsts = (rows[:, 0] // 8).tolist()
    assert sorted(firsts[:10]) == list(range(10)) and sorted(firsts[10:]) == list(range(10))
    assert firsts[:10] != firsts[10:]  # a new permutation per epoch
    assert firsts[:10] != list(range(10))


def _view(tmp_path: Path, num_tokens: int) -> SplitView:
    with IndexedDatasetWriter(tmp_path / "val", np.uint16) as w:
        w.add_document(np.arange(num_tokens, dtype=np.uint16))
    ds = IndexedDataset(tmp_path / "val")
    return SplitView("src", "valid", 1.0, ds, "val", 0, 1, "c0ffee", tmp_path)


def test_eval_set_is_fixed_evenly_spaced_and_independent_of_the_layout(tmp_path: Path) -> None:
    view = _view(tmp_path, 81)  # 10 windows of 8
    whole, capped = EvalSet(view, 8, 100), EvalSet(view, 8, 4)
    assert whole.num_samples == 10 and whole.num_tokens == 80
    assert capped.windows.tolist() == [0, 2, 5, 7]  # spread over the split, not its first four windows

    def rows(eval_set: EvalSet, mb: int, dp: int) -> list[int]:
        return [int(v) // 8 for r in range(dp) for x, _ in eval_set.rank_batches(mb, r, dp) for v in x[:, 0]]

    # every (micro-batch, dp) layout reads exactly the same samples, once each, unshuffled
    for mb, dp in [(1, 1), (4, 1), (3, 2), (2, 3), (16, 4)]:
        assert rows(whole, mb, dp) == list(range(10)), (mb, dp)
    first = [x for x, _ in whole.rank_batches(4)]
    assert all(torch.equal(p, q) for p, q in zip(first, [x for x, _ in whole.rank_batches(4)], strict=True))
    assert [len(x) for x in first] == [4, 4, 2]  # the last micro-batch is short, not wrapped


def test_seq_len_longer_than_split_is_config_error() -> None:
    with pytest.raises(ConfigError, match="data.seq_len"):
        SampleStream(np.arange(8, dtype=np.uint16), 8)


# ---------------------------------------------------------------- prepare CLI


def _write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(6):
        (texts / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}  # héllo ✓\n" * 20)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i}: the quick brown fox ünïcode", "id": i})
                               for i in range(30)) + "\n")
    return texts, jsonl


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_cli_text_and_jsonl(tmp_path: Path, tokenizer: str, capsys: pytest.CaptureFixture) -> None:
    texts, jsonl = _write_inputs(tmp_path)
    out = tmp_path / "out"
    rc = prepare_main([str(texts), str(jsonl), "--output", str(out), "--tokenizer", tokenizer,
                       "--vocab-size", "300", "--val-fraction", "0.2"])
    assert rc == 0
    assert "36 documents" in capsys.readouterr().out
    ds = open_dataset_dir(out, verify_checksum=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_documents"]["train"] + meta["num_documents"]["val"] == 36
    assert len(ds.val) >= 1 and ds.vocab_size == (257 if tokenizer == "byte" else 300)
    sample = "def g(y):\n    return y  # héllo ✓ <|endoftext|>"
    assert ds.tokenizer.decode(ds.tokenizer.encode(sample)) == sample
    docs = [ds.tokenizer.decode(ds.train[i][:-1].tolist()) for i in range(len(ds.train))]
    assert all(ds.train[i][-1] == ds.eod_id for i in range(len(ds.train)))
    assert any(d.startswith("def f") for d in docs) and any(d.startswith("line ") for d in docs)
    # usable by the loader straight away
    x, y = next(build_train_iterator(open_sources(DataConfig(name="indexed", path=str(out))), seq_len=16,
                                     micro_batch_size=2, seed=1))
    assert x.shape == (2, 16) and int(x.max()) < ds.vocab_size


def test_prepare_cli_missing_text_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    rc = prepare_main([str(bad), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "'text'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert prepare_main([str(tmp_path / "empty_dir_missing"), "--output", str(tmp_path / "o")]) == 2
