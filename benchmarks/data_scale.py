"""Data at scale: open time, time to the first batch and resident memory of a rank, for small and big datasets.

Writes synthetic prepared dataset directories (uint16 tokens of the byte tokenizer, documents of
exponentially distributed lengths, mean ~1500 tokens, each ending in EOD) of each ``--sizes`` GB
under ``--dir`` (reused when present), then measures, each in a fresh process so that its resident
memory is that of one rank, the path training takes: ``open_dataset_dir`` -> ``CachedEpochOrder`` +
``prepare_epoch_orders`` -> ``SampleStream`` -> the first ``BatchIterator`` micro-batch.

Rows per size:

* ``cold cache``: shuffle cache empty (the process builds it) and the page cache cold;
* ``warm cache, cold pages``: shuffle cache built, page cache cold;
* ``warm cache``: shuffle cache built, page cache warm (a restarted job on the same node);
* ``in memory``: no shuffle cache (the order computed in this process), page cache warm: the baseline.

"Cold pages" is ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the dataset's and the cache's files before
the process starts: their clean pages leave the page cache, so they are read from disk again (the
closest to a fresh node this benchmark can get without root's ``drop_caches``). Times are wall
seconds inside the process after its imports; RSS is read from ``/proc/self/status`` after the batch.

    python benchmarks/data_scale.py [--sizes 0.5 8] [--dir /tmp/trainrun-data-scale] [--keep]

Prints a table and one JSON line. Goals: first batch (open + prepare + batch) under 2 s with a warm
cache, and resident memory that does not grow with the dataset (under 50 MB between the sizes).
Datasets over 1 GB are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from trainrun.data.indexed import MAGIC, VERSION, dtype_code
from trainrun.data.layout import FORMAT_VERSION, META_FILE, SPLITS
from trainrun.data.tokenizer import ByteTokenizer

GB = 1e9
MEAN_DOC_TOKENS = 1500
VAL_TOKENS = 1 << 20  # a small validation split: training reads only the train split
WRITE_CHUNK = 1 << 26  # tokens generated and written per step (128 MiB of uint16)
ROWS = ("cold cache", "warm cache, cold pages", "warm cache", "in memory")
RSS_GOAL_MB, FIRST_BATCH_GOAL_S = 50.0, 2.0


# ---- synthetic datasets -----------------------------------------------------------------------------


def _doc_lengths(rng: np.random.Generator, num_tokens: int) -> np.ndarray:
    """Document lengths (EOD included) summing to exactly ``num_tokens``."""
    n = int(num_tokens / MEAN_DOC_TOKENS * 1.1) + 16
    lengths = (rng.exponential(MEAN_DOC_TOKENS, n) + 1).astype(np.int64)
    ends = np.cumsum(lengths)
    assert ends[-1] >= num_tokens, "too few documents drawn"  # 10% spare: fails only for tiny sizes
    count = int(np.searchsorted(ends, num_tokens)) + 1
    lengths = lengths[:count]
    lengths[-1] -= int(ends[count - 1]) - num_tokens  # trim the last document to the exact total
    return lengths.astype(np.int32)


def _write_split(prefix: Path, num_tokens: int, rng: np.random.Generator, eod: int,
                 checksum: hashlib._Hash) -> tuple[int, bytes]:
    """Write ``<prefix>.bin/.idx`` of random tokens in large chunks, hashing the ``.bin`` into ``checksum``.

    Returns the document count and the ``.idx`` bytes (the checksum hashes them after both ``.bin`` files).
    """
    dtype = np.dtype(np.uint16)
    lengths = _doc_lengths(rng, num_tokens)
    eods = np.cumsum(lengths.astype(np.int64)) - 1  # position of each document's EOD
    with open(f"{prefix}.bin", "wb") as f:
        for start in range(0, num_tokens, WRITE_CHUNK):
            chunk = rng.integers(0, eod, min(WRITE_CHUNK, num_tokens - start), dtype=dtype)
            lo, hi = np.searchsorted(eods, [start, start + len(chunk)])
            chunk[eods[lo:hi] - start] = eod
            data = chunk.tobytes()
            checksum.update(data)  # hashed while written: no second pass over gigabytes
            f.write(data)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    # Megatron's MMap index, as trainrun.data.indexed documents it.
    idx = b"".join([MAGIC, struct.pack("<Q", VERSION), struct.pack("<B", dtype_code(dtype)),
                    struct.pack("<QQ", len(lengths), len(doc_idx)), lengths.tobytes(), pointers.tobytes(),
                    doc_idx.tobytes()])
    Path(f"{prefix}.idx").write_bytes(idx)
    return len(lengths), idx


def make_dataset(directory: Path, size_gb: float, seed: int = 0) -> None:
    """A prepared dataset directory with ``size_gb`` GB of train tokens (reused when complete)."""
    if (directory / META_FILE).is_file():
        return
    started = time.perf_counter()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = ByteTokenizer()
    rng = np.random.default_rng(seed)
    tokens = {"train": int(size_gb * GB) // 2, "val": VAL_TOKENS}
    # meta.json's checksum: sha256 of train.bin, val.bin, train.idx, val.idx in that order (trainrun.data.layout).
    checksum = hashlib.sha256()
    written = {s: _write_split(tmp / s, tokens[s], rng, tok.eod_id, checksum) for s in SPLITS}
    for s in SPLITS:
        checksum.update(written[s][1])
    docs = {s: written[s][0] for s in SPLITS}
    meta = {"format_version": FORMAT_VERSION, "tokenizer": "byte", "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id, "dtype": "uint16", "num_documents": docs, "num_tokens": tokens,
            "max_token_id": {s: tok.eod_id for s in SPLITS}, "checksum": checksum.hexdigest(),
            "source": f"synthetic {size_gb} GB (benchmarks/data_scale.py)"}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory)
    print(f"wrote {directory}: {tokens['train']:,} train tokens, {docs['train']:,} documents in "
          f"{time.perf_counter() - started:.1f} s", flush=True)


# ---- one measurement, in its own process ------------------------------------------------------------


def _rss_mb() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MB (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def measure(data_dir: Path, cache_root: Path | None, seq_len: int, micro_batch: int, epochs: int) -> dict:
    """What one rank does before its first step; returns times (s) and resident memory (MiB)."""
    import torch

    from trainrun.data.datasets import open_dataset_dir
    from trainrun.data.index_cache import CachedEpochOrder, prepare_epoch_orders
    from trainrun.data.loader import BatchIterator, SampleStream
    from trainrun.distributed.env import DistEnv

    before = _rss_mb()
    t0 = time.perf_counter()
    ds = open_dataset_dir(data_dir)
    t1 = time.perf_counter()
    train = ds.train
    num_samples = (train.num_tokens - 1) // seq_len
    order = None
    if cache_root is not None:
        identity = {"source_checksum": ds.checksum, "split": "train", "first_document": 0,
                    "end_document": len(train), "first_token": 0, "end_token": train.num_tokens, "seq_len": seq_len}
        order = CachedEpochOrder(cache_root, identity, num_samples, seed=1234)
        prepare_epoch_orders([(order, epochs)], DistEnv(0, 0, 1, torch.device("cpu"), None, "single"))
    t2 = time.perf_counter()
    # SampleStream.from_indexed's stream, with the order attached.
    stream = SampleStream(train.tokens[: train.num_tokens], seq_len, seed=1234, order=order)
    # A rank in the middle of the data-parallel group, at the start of the run.
    inputs, _ = next(BatchIterator(stream, micro_batch, dp_rank=3, dp_size=8))
    t3 = time.perf_counter()
    assert inputs.shape == (micro_batch, seq_len)
    rss = _rss_mb()
    return {"open_s": t1 - t0, "prepare_s": t2 - t1, "batch_s": t3 - t2, "first_batch_s": t3 - t0,
            "rss_mb": rss["VmRSS"], "rss_anon_mb": rss["RssAnon"], "rss_file_mb": rss["RssFile"],
            "rss_growth_mb": rss["VmRSS"] - before["VmRSS"], "num_samples": num_samples,
            "documents": len(train), "train_bytes": train.tokens.nbytes}


def drop_from_page_cache(*roots: Path) -> None:
    """Evict the clean pages of every file under ``roots`` from the page cache (what "cold pages" means here)."""
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped: write them first
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_row(row: str, data_dir: Path, cache_root: Path, args: argparse.Namespace) -> dict:
    """Prepare the caches for ``row`` and measure it in a fresh Python process."""
    if row == "cold cache":
        shutil.rmtree(cache_root, ignore_errors=True)
    if row in ("cold cache", "warm cache, cold pages"):
        drop_from_page_cache(data_dir, *([cache_root] if cache_root.exists() else []))
    job = {"data_dir": str(data_dir), "cache_root": None if row == "in memory" else str(cache_root),
           "seq_len": args.seq_len, "micro_batch": args.micro_batch, "epochs": args.epochs}
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the benchmark ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 8.0], help="train split sizes in GB")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/trainrun-data-scale"), help="where datasets live")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="shuffle epochs prepared before the first batch")
    parser.add_argument("--keep", action="store_true", help="keep datasets over 1 GB")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, JSON in and out
    args = parser.parse_args()
    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(Path(job["data_dir"]), job["cache_root"] and Path(job["cache_root"]),
                                 job["seq_len"], job["micro_batch"], job["epochs"])))
        return

    args.dir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.dir).free / GB
    results: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        data_dir = args.dir / f"data-{size:g}gb"
        if not (data_dir / META_FILE).is_file() and size + 1 > free_gb:
            sys.exit(f"{args.dir} has {free_gb:.1f} GB free, too little for a {size:g} GB dataset")
        make_dataset(data_dir, size)
        cache_root = args.dir / f"cache-{size:g}gb"
        results[f"{size:g}"] = {row: run_row(row, data_dir, cache_root, args) for row in ROWS}
        if size > 1 and not args.keep:
            shutil.rmtree(data_dir)
            shutil.rmtree(cache_root, ignore_errors=True)
    report(results, args)


def report(results: dict[str, dict[str, dict]], args: argparse.Namespace) -> None:
    """The table, the goals and one JSON line."""
    header = ("| size GB | documents | samples | case | open s | prepare s | batch s | first batch s | "
              "VmRSS MB | RssAnon MB | RssFile MB |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for size, rows in results.items():
        for row, r in rows.items():
            print(f"| {size} | {r['documents']:,} | {r['num_samples']:,} | {row} | {r['open_s']:.3f} | "
                  f"{r['prepare_s']:.3f} | {r['batch_s']:.3f} | {r['first_batch_s']:.3f} | {r['rss_mb']:.1f} | "
                  f"{r['rss_anon_mb']:.1f} | {r['rss_file_mb']:.1f} |")
    warm = max(rows["warm cache"]["first_batch_s"] for rows in results.values())
    rss = {row: [rows[row]["rss_mb"] for rows in results.values()] for row in ROWS}
    spread = {row: max(v) - min(v) for row, v in rss.items()}
    worst = max(spread[row] for row in ROWS if row != "in memory")
    print(f"first batch with a warm cache: {warm:.2f} s at most (goal < {FIRST_BATCH_GOAL_S:g} s); VmRSS "
          f"spread between sizes: {worst:.1f} MB at most with the cache (goal < {RSS_GOAL_MB:g} MB), "
          f"{spread['in memory']:.1f} MB with the order in memory")
    print(json.dumps({"benchmark": "data_scale", "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                      "results": {s: {row: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                                      for row, r in rows.items()} for s, rows in results.items()},
                      "warm_first_batch_s": round(warm, 4), "rss_spread_mb": round(worst, 1),
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "goal_met": warm < FIRST_BATCH_GOAL_S and worst < RSS_GOAL_MB}))


if __name__ == "__main__":
    main()
