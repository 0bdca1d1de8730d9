"""Tokenizing ``trainrun-prepare``'s documents: in this process, or in ``--workers`` processes, always in order.

The parent reads the inputs and writes the dataset; tokenizing (and parsing each JSONL line, the
other per-document cost) happens in :class:`ChunkEncoder`, on chunks of :data:`ENCODE_CHUNK`
documents. With one worker the encoder runs here and a Hugging Face tokenizer's ``encode_batch``
spreads each chunk over the Rust backend's threads. With ``N > 1`` workers, N processes (forked
from this one where that is safe, else from a clean fork server) each rebuild the tokenizer once,
from its ``tokenizer.json`` text (so a BPE trained in the parent travels too), and encode whole
chunks; the backend's threads are divided between them (none when there are as many workers as
cores), so that N processes do not each start a thread per core.

Results come back in submission order, and at most :data:`IN_FLIGHT_PER_WORKER` chunks per worker
are outstanding: the output is byte-identical to one worker's whatever N is, and memory stays
bounded however large the input (``Pool.imap`` would read ahead without limit). Each chunk travels
back as two NumPy arrays (tokens and lengths), not as lists of Python ints, which would cost more to
pickle than to tokenize.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from trainrun.data.indexed import token_dtype
from trainrun.data.prepare_readers import Record, record_text
from trainrun.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

ENCODE_CHUNK = 256  # most documents per chunk: one encode_batch call, one message to and from a worker
CHUNK_CHARS = 1 << 18  # most characters per chunk (one document may pass it): even work, so no worker idles long
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: enough to keep it busy, bounded memory


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker process needs to rebuild the parent's tokenizer: small and picklable."""

    cls: type[BPETokenizer] | None  # None: ByteTokenizer
    tokenizer_json: str | None
    eod_token: str | None

    @classmethod
    def of(cls, tok: Tokenizer) -> TokenizerSpec:
        """The spec of ``tok`` (a :class:`ByteTokenizer`, or a BPE / Hugging Face fast tokenizer)."""
        if isinstance(tok, BPETokenizer):
            return cls(type(tok), tok.backend.to_str(), tok.backend.id_to_token(tok.eod_id))
        if isinstance(tok, ByteTokenizer):
            return cls(None, None, None)
        raise TypeError(f"cannot encode in worker processes with a {type(tok).__name__}")

    def build(self) -> Tokenizer:
        """A tokenizer that encodes exactly as the one this spec was made of."""
        if self.cls is None:
            return ByteTokenizer()
        from tokenizers import Tokenizer as Backend

        return self.cls(Backend.from_str(self.tokenizer_json), self.eod_token)


@dataclass(frozen=True)
class Encoded:
    """One chunk of documents, tokenized (without EOD)."""

    tokens: np.ndarray  # every document's tokens, concatenated, in the dataset's token dtype
    lengths: np.ndarray  # int64, tokens per document
    empty: np.ndarray  # bool per document: its text was empty (such a document is not stored)

    def documents(self) -> Iterator[tuple[np.ndarray, bool]]:
        """``(tokens, empty)`` of each document, as views into :attr:`tokens`."""
        ends = np.cumsum(self.lengths)
        starts = ends - self.lengths
        for start, end, empty in zip(starts.tolist(), ends.tolist(), self.empty.tolist(), strict=True):
            yield self.tokens[start:end], empty


class ChunkEncoder:
    """Turn a chunk of :data:`~trainrun.data.prepare_readers.Record` into :class:`Encoded` tokens."""

    def __init__(self, tokenizer: Tokenizer, text_key: str):
        self.tokenizer = tokenizer
        self.text_key = text_key
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, chunk: list[Record]) -> Encoded:
        """Parse (JSONL) and tokenize every record of ``chunk``; a bad record raises its PrepareError."""
        texts = [record_text(r, self.text_key) for r in chunk]
        empty = np.fromiter((not t for t in texts), dtype=bool, count=len(texts))
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer):  # the UTF-8 bytes are the tokens: no per-byte Python ints
            parts = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
            lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
            tokens = np.concatenate(parts).astype(self.dtype) if parts else np.empty(0, self.dtype)
            return Encoded(tokens, lengths, empty)
        ids = tok.encode_batch(texts) if isinstance(tok, BPETokenizer) else [tok.encode(t) for t in texts]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return Encoded(tokens, lengths, empty)


def chunked(items: Iterable[Record], size: int = ENCODE_CHUNK, max_chars: int = CHUNK_CHARS) -> Iterator[list[Record]]:
    """``items`` in order, in lists of at most ``size`` records that end once they hold ``max_chars`` characters.

    Bounding the text as well as the count keeps chunks of long documents from being so large that,
    at the end of the input, one worker still encodes its last chunk while the others wait.
    """
    chunk: list[Record] = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(item[2])
        if len(chunk) >= size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


_ENCODER: ChunkEncoder | None = None  # a worker process's encoder, built once by _init_worker


def _init_worker(spec: TokenizerSpec, text_key: str, threads: int) -> None:
    # Before the tokenizer's first encode: the Rust backend reads these when it starts its threads.
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    global _ENCODER
    _ENCODER = ChunkEncoder(spec.build(), text_key)


def _encode_in_worker(chunk: list[Record]) -> Encoded:
    assert _ENCODER is not None, "_init_worker runs first in every worker"
    return _ENCODER(chunk)


@contextmanager
def _parallelism_configured() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM`` set (to its default, so nothing changes here) if it is not.

    A process forked after the tokenizer's Rust threads ran prints a two-line warning from the
    tokenizers library unless the variable is set; the workers set it to false before encoding anyway.
    """
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def start_workers_early(workers: int, may_fork: bool) -> None:
    """Start the fork server now, when :func:`encode_chunks` will use one, so that its imports overlap the
    reading that comes before tokenizing (checks, split keys, loading the tokenizer)."""
    if workers > 1 and _context(may_fork).get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()  # launches the server and returns; it imports while this process reads


def _context(may_fork: bool) -> multiprocessing.context.BaseContext:
    """Where workers come from: a plain fork where that is safe, else a fork server, else spawn.

    Forking copies the parent as it is, so the workers start at once with everything imported. It is
    safe on Linux while the parent runs no other Python thread and no thread pool a worker would use:
    ``may_fork`` is the caller's word for that (Arrow's pool starts when Parquet or ``datasets`` are
    read; the tokenizer's Rust pool may have run here, but a forked worker never uses it, since it
    encodes with one thread). Otherwise a fork server, a clean single-threaded process that imports
    this module (with numpy, tokenizers and, through the ``trainrun.data`` package, torch) once and
    forks the workers; spawn where there is none.
    """
    if may_fork and sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # applies when the server starts (once per process)
        return context
    return multiprocessing.get_context("spawn")


def encode_chunks(chunks: Iterable[list[Record]], tokenizer: Tokenizer, text_key: str,
                  workers: int = 1, may_fork: bool = False) -> Iterator[Encoded]:
    """Encode ``chunks`` in order, in this process (``workers == 1``) or in ``workers`` processes.

    ``may_fork``: this process has started no thread pool, so workers may be forked from it (see
    :func:`_context`).

    The first bad record (in input order) raises its PrepareError here, whichever worker met it.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        encoder = ChunkEncoder(tokenizer, text_key)
        for chunk in chunks:
            yield encoder(chunk)
        return
    spec = TokenizerSpec.of(tokenizer)
    threads = max(1, available_cpus() // workers)
    context = _context(may_fork and threads == 1)
    with _parallelism_configured():  # while the pool forks its workers
        pool = context.Pool(workers, initializer=_init_worker, initargs=(spec, text_key, threads))
    with pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    # Leaving the with-block terminates the pool, also on an error or Ctrl-C mid-way.


class Progress:
    """A progress bar of documents, with tokens and tokens/s, on stderr; only on an interactive terminal,
    so that logs and CI output stay clean."""

    def __init__(self, total_documents: int, desc: str = "tokenizing", enabled: bool | None = None):
        self.tokens = 0
        self.start = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty() if enabled is None else enabled:
            from tqdm import tqdm

            class Bar(tqdm):
                monitor_interval = 0  # no monitor thread: workers may then be forked from this process

            self._bar = Bar(total=total_documents, desc=desc, unit="doc", file=sys.stderr, dynamic_ncols=True)

    def update(self, documents: int, tokens: int) -> None:
        """Count ``documents`` more, holding ``tokens`` tokens."""
        self.tokens += tokens
        if self._bar is None:
            return
        from tqdm import tqdm

        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self._bar.set_postfix_str(f"{tqdm.format_sizeof(self.tokens)} tokens, {tqdm.format_sizeof(rate)} tokens/s",
                                  refresh=False)
        self._bar.update(documents)

    def close(self) -> None:
        """Leave the finished bar on the terminal."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
