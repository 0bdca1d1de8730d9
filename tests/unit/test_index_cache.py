"""The on-disk shuffle cache (same orders as in memory, keyed by its inputs, never used when wrong), and the
resident memory of a rank that opens a dataset."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainrun.data import index_cache
from trainrun.data.index_cache import CachedEpochOrder, order_dtype, prepare_epoch_orders
from trainrun.data.indexed import IndexedDataset, IndexedDatasetWriter
from trainrun.data.loader import BatchIterator, SampleStream, epoch_permutation
from trainrun.distributed.env import DistEnv

IDENTITY = {"source_checksum": "ab" * 32, "split": "train", "first_document": 0, "end_document": 50,
            "first_token": 0, "end_token": 5000, "seq_len": 16}
SINGLE = DistEnv(0, 0, 1, torch.device("cpu"), None, "single")


def _order(root: Path, num_samples: int = 1000, seed: int = 3, **identity) -> CachedEpochOrder:
    return CachedEpochOrder(root, {**IDENTITY, **identity}, num_samples, seed)


def test_cached_orders_equal_the_in_memory_ones_and_are_memory_mapped(tmp_path: Path) -> None:
    order = _order(tmp_path)
    assert order.ensure(3) == [0, 1, 2]
    for epoch in range(3):
        cached = order.permutation(epoch)
        assert isinstance(cached, np.memmap) and cached.dtype == np.int32  # mapped, not loaded
        np.testing.assert_array_equal(cached, epoch_permutation(3, epoch, 1000))
    assert not np.array_equal(order.permutation(0), order.permutation(1))
    desc = json.loads((order.directory / "desc.json").read_text())
    assert desc["identity"] == IDENTITY and desc["seed"] == 3 and desc["num_samples"] == 1000
    assert order.directory == tmp_path / "indices" / order.key[:32]
    assert order.ensure(3) == []  # nothing left to build


def test_int64_only_when_an_index_does_not_fit_int32() -> None:
    assert order_dtype(2**31 - 1) == np.int32
    assert order_dtype(2**31) == np.int64


@pytest.mark.parametrize("change", [{"seed": 4}, {"num_samples": 999}, {"seq_len": 32}, {"split": "val"},
                                    {"source_checksum": "cd" * 32}, {"end_token": 5001}])
def test_the_key_names_every_input(tmp_path: Path, change: dict) -> None:
    base = _order(tmp_path)
    other = _order(tmp_path, **change)
    assert other.key != base.key and other.directory != base.directory
    assert _order(tmp_path).key == base.key  # and nothing else moves it


def _copy_other_seed(order: CachedEpochOrder, root: Path) -> Path:
    other = _order(root, seed=99)
    other.ensure(1)
    shutil.copy(other.epoch_path(0), order.epoch_path(0))
    return order.epoch_path(0)


def _copy_other_seed_with_check(order: CachedEpochOrder, root: Path) -> Path:
    other = _order(root, seed=99)
    other.ensure(1)
    for name in ("shuffle-e0.npy", "shuffle-e0.json"):
        shutil.copy(other.directory / name, order.directory / name)
    return order.directory / "shuffle-e0.json"


def _copy_other_epoch(order: CachedEpochOrder, root: Path) -> Path:
    shutil.copy(order.epoch_path(1), order.epoch_path(0))
    return order.epoch_path(0)


def _truncate(order: CachedEpochOrder, root: Path) -> Path:
    path = order.epoch_path(0)
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _tamper_desc(order: CachedEpochOrder, root: Path) -> Path:
    path = order.directory / "desc.json"
    desc = json.loads(path.read_text())
    desc["seed"] = 4
    path.write_text(json.dumps(desc))
    return path


def _garble(order: CachedEpochOrder, root: Path) -> Path:
    order.epoch_path(0).write_bytes(b"not an array")
    return order.epoch_path(0)


@pytest.mark.parametrize("tamper", [_copy_other_seed, _copy_other_seed_with_check, _copy_other_epoch, _truncate,
                                    _tamper_desc, _garble])
def test_a_file_built_for_other_inputs_is_never_used(tmp_path: Path, tamper, caplog) -> None:
    _order(tmp_path).ensure(2)
    bad = tamper(_order(tmp_path), tmp_path)
    order = _order(tmp_path)  # a fresh reader, as a new run would be
    assert order.open(0)[0] is None and str(bad) in order.open(0)[1]
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        got = order.permutation(0)
    np.testing.assert_array_equal(got, epoch_permutation(3, 0, 1000))
    assert any(str(bad) in r.getMessage() and "not using" in r.getMessage() for r in caplog.records)
    assert _order(tmp_path).open(0)[0] is not None  # rebuilt in place


def test_a_missing_epoch_is_computed_in_memory_with_one_warning(tmp_path: Path, caplog) -> None:
    order = _order(tmp_path)
    order.ensure(1)
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        first, again = order.permutation(2), order.permutation(2)
    np.testing.assert_array_equal(first, epoch_permutation(3, 2, 1000))
    np.testing.assert_array_equal(again, first)
    assert not isinstance(first, np.memmap) and not order.epoch_path(2).exists()
    assert [r.getMessage() for r in caplog.records if "lacks epoch 2" in r.getMessage()] != []
    assert len([r for r in caplog.records if "lacks epoch 2" in r.getMessage()]) == 1


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only mount answers (chmod cannot stand in: the tests may run as root)."""
    def refuse(path, write):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(index_cache, "_atomic_write", refuse)


def test_a_read_only_cache_computes_in_memory(tmp_path: Path, monkeypatch, caplog) -> None:
    _order(tmp_path).ensure(1)
    _truncate(_order(tmp_path), tmp_path)
    _read_only(monkeypatch)
    order = _order(tmp_path)
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        for epoch in range(2):  # epoch 0 invalid, epoch 1 missing
            np.testing.assert_array_equal(order.permutation(epoch), epoch_permutation(3, epoch, 1000))
        prepare_epoch_orders([(order, 2)], SINGLE)  # warns, does not raise
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError):
        order.ensure(2)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.npy"

    def crash(f):
        f.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        index_cache._atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []


def _build(root: str, barrier) -> None:
    barrier.wait()  # start together, so the two builders really race
    _order(Path(root), num_samples=200_000).ensure(3)


def test_concurrent_builders_end_with_valid_files(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_build, args=(str(tmp_path), barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    order = _order(tmp_path, num_samples=200_000)
    assert order.missing(3) == []
    for epoch in range(3):
        np.testing.assert_array_equal(order.permutation(epoch), epoch_permutation(3, epoch, 200_000))
    assert not [p.name for p in order.directory.iterdir() if ".tmp-" in p.name]


def test_prepare_builds_once_then_uses_the_cache(tmp_path: Path, caplog) -> None:
    orders = [(_order(tmp_path), 2), (_order(tmp_path, split="val", num_samples=77), 1)]
    with caplog.at_level(logging.INFO, logger=index_cache.__name__):
        prepare_epoch_orders(orders, SINGLE)
    assert any("built 3 shuffle epoch(s)" in r.getMessage() for r in caplog.records)
    files = sorted(tmp_path.rglob("shuffle-e*.npy"))
    assert len(files) == 3
    stamps = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=index_cache.__name__):
        prepare_epoch_orders([(_order(tmp_path), 2), (_order(tmp_path, split="val", num_samples=77), 1)], SINGLE)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == stamps  # nothing rewritten
    assert any("used as is" in r.getMessage() for r in caplog.records)


# ---- through the sample stream, against the stream without a cache --------------------------------


def _dataset(tmp_path: Path, lengths: np.ndarray, seed: int = 0) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(tmp_path / "train", np.uint16) as w:
        for n in lengths:
            w.add_document(rng.integers(1, 1000, int(n), dtype=np.uint16))
    return IndexedDataset(tmp_path / "train")


def _cached_and_plain(tmp_path: Path, ds: IndexedDataset, seq_len: int, seed: int = 5,
                      epochs: int = 2) -> tuple[SampleStream, SampleStream]:
    tokens = ds.tokens[: ds.num_tokens]
    plain = SampleStream(tokens, seq_len, seed=seed)
    order = CachedEpochOrder(tmp_path / "cache", {**IDENTITY, "seq_len": seq_len, "end_token": ds.num_tokens},
                             plain.num_samples, seed)
    prepare_epoch_orders([(order, epochs)], SINGLE)
    return SampleStream(tokens, seq_len, seed=seed, order=order), plain


def _assert_same_batches(cached: SampleStream, plain: SampleStream, micro_batch: int, steps: int) -> None:
    a, b = BatchIterator(cached, micro_batch), BatchIterator(plain, micro_batch)
    for _ in range(steps):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_documents_longer_than_seq_len(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, np.full(20, 500))  # each document spans ~15 samples of 32
    cached, plain = _cached_and_plain(tmp_path, ds, seq_len=32)
    _assert_same_batches(cached, plain, micro_batch=16, steps=2 * cached.num_samples // 16)
    assert isinstance(cached.permutation(0), np.memmap)


def test_many_tiny_documents(tmp_path: Path) -> None:
    lengths = np.random.default_rng(1).integers(1, 4, 100_000)  # 1-3 tokens each
    ds = _dataset(tmp_path, lengths)
    cached, plain = _cached_and_plain(tmp_path, ds, seq_len=64)
    _assert_same_batches(cached, plain, micro_batch=32, steps=50)


def test_a_batch_straddling_an_epoch_boundary(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, np.full(10, 101))  # 1010 tokens: 63 samples of 16, so batches of 10 straddle
    cached, plain = _cached_and_plain(tmp_path, ds, seq_len=16, epochs=3)
    assert cached.num_samples % 10 != 0
    _assert_same_batches(cached, plain, micro_batch=10, steps=3 * cached.num_samples // 10)
    # One batch holds the end of epoch 0 and the start of epoch 1.
    straddle = range(cached.num_samples - 4, cached.num_samples + 6)
    xa, _ = cached.batch(straddle)
    xb, _ = plain.batch(straddle)
    assert torch.equal(xa, xb)


# ---- resident memory after opening a dataset -------------------------------------------------------


def _resident_kb(path: Path) -> int:
    """Resident KB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode [path]"
            inside = line.rstrip().endswith(str(path))
        elif inside and head == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_opening_and_checking_leaves_neither_file_resident(tmp_path: Path) -> None:
    from trainrun.data.checks import check_split

    ds = _dataset(tmp_path, np.full(200_000, 20))  # 8 MB .bin, 4.8 MB .idx: scanned and checked whole at open
    meta = {"vocab_size": 1000, "dtype": "uint16", "num_documents": {"train": 200_000},
            "num_tokens": {"train": 4_000_000}, "max_token_id": {"train": ds.token_range()[1]}}
    assert check_split(tmp_path, "train", ds, meta) == meta["max_token_id"]["train"]
    # Before: every page of both (12.8 MB). Now the .bin is read, not mapped in, and the .idx pages are released.
    assert _resident_kb(ds.bin_path) == 0
    assert _resident_kb(ds.idx_path) <= 64
    np.testing.assert_array_equal(ds.get(123_456), ds.tokens[123_456 * 20 : 123_457 * 20])  # still readable
