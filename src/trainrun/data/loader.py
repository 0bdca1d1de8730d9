"""Training samples as Megatron's GPTDataset cuts them, and resumable data-parallel batching.

A split's documents (each ending in EOD) are one token stream of N tokens. Sample ``i`` is tokens
``[i*seq_len, i*seq_len + seq_len + 1)``: the model reads the first ``seq_len`` and predicts the
last ``seq_len``, and consecutive samples share one boundary token, so every token but the first is
a target exactly once per epoch. There are ``(N - 1) // seq_len`` samples.

Training visits them in a fresh seeded permutation per epoch; global sample ``g`` is position
``g % num_samples`` of epoch ``g // num_samples``. A batch is defined by global sample indices
alone, so the data a run sees depends on ``(seed, seq_len, consumed_samples)`` and not on the
number of ranks, the micro-batch split or restarts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from trainrun.data.blend import BlendPhase, refuse_blend_change
from trainrun.data.indexed import IndexedDataset
from trainrun.data.sources import DataSources, SplitView
from trainrun.errors import ConfigError

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


class EpochOrder(Protocol):
    """Where a stream's per-epoch sample orders come from (see :mod:`trainrun.data.index_cache`)."""

    def permutation(self, epoch: int) -> np.ndarray:
        """The shuffled order of ``num_samples`` sample indices for ``epoch``."""
        ...


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation seeded by ``(seed, epoch)`` (the definition every cache keeps)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_samples)


class SampleStream:
    """``seq_len + 1``-token windows over one split's token stream, optionally shuffled per epoch.

    ``tokens`` is the split's whole ``.bin`` memory map: documents are stored back to back with
    their EOD, so the concatenated stream needs no index lookups and a sample is one slice.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True,
                 split: str = "train", order: EpochOrder | None = None):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.split = split
        self.num_tokens = int(tokens.shape[0])
        self.num_samples = max(self.num_tokens - 1, 0) // self.seq_len
        if self.num_samples == 0:
            raise ConfigError("data.seq_len", seq_len, f"the {split} split has only {self.num_tokens} tokens, fewer "
                              f"than seq_len + 1; lower data.seq_len or add data")
        # A couple of epochs' permutations: enough for a batch that straddles an epoch boundary.
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        # The cached, memory-mapped orders; None: computed here, in memory.
        self.order = order

    @classmethod
    def from_indexed(cls, dataset: IndexedDataset, seq_len: int, seed: int = 0, shuffle: bool = True,
                     split: str = "train") -> SampleStream:
        """A stream over every document of ``dataset`` in storage order."""
        if not dataset.is_contiguous():
            # Only foreign files could have gaps; ours are always written back to back.
            raise ValueError(f"{dataset.path_prefix}: documents are not contiguous in the .bin file")
        return cls(dataset.tokens[: dataset.num_tokens], seq_len, seed, shuffle, split)

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        perm = self._perms.get(epoch)
        if perm is None:
            if self.order is not None:
                perm = self.order.permutation(epoch)
            else:
                perm = epoch_permutation(self.seed, epoch, self.num_samples)
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def window_index(self, global_index: int) -> int:
        """Which window (unshuffled sample index) global sample ``global_index`` is."""
        if global_index < 0:
            raise IndexError(f"negative sample index {global_index}")
        epoch, pos = divmod(int(global_index), self.num_samples)
        return int(self.permutation(epoch)[pos]) if self.shuffle else pos

    def window(self, index: int) -> np.ndarray:
        """Unshuffled sample ``index``: a read-only view of ``seq_len + 1`` tokens."""
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def sample(self, global_index: int) -> np.ndarray:
        """Global sample ``global_index`` (epochs continue past ``num_samples``)."""
        return self.window(self.window_index(global_index))

    def batch(self, global_indices: range | list[int], window_indices: bool = False) -> Batch:
        """``(inputs, targets)`` int64 tensors of shape ``(len(indices), seq_len)``.

        Each token is copied once, straight from the memory map into the output (with the cast to
        int64); the arrays are handed to torch without another copy.
        """
        n, t = len(global_indices), self.seq_len
        inputs = np.empty((n, t), dtype=np.int64)
        targets = np.empty((n, t), dtype=np.int64)
        for row, g in enumerate(global_indices):
            w = self.window(g if window_indices else self.window_index(g))
            inputs[row] = w[:-1]
            targets[row] = w[1:]
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class BlendedStream:
    """The global sample stream of a blend: sample ``g`` is sample ``k`` of source ``s``'s own shuffled stream,
    with ``(s, k)`` from the weights and ``g`` alone (see :mod:`trainrun.data.blend`).

    One source is the plain case: sample ``g`` is that source's sample ``g``. ``phases`` records each blend in
    force since the run began (a new one per accepted blend change), the last one reading on.
    """

    def __init__(self, streams: Sequence[SampleStream], names: Sequence[str], weights: Sequence[float],
                 allow_blend_change: bool = False):
        if not streams:
            raise ValueError("a blend needs at least one source")
        self.streams, self.names = list(streams), tuple(names)
        self.weights = tuple(float(w) for w in weights)
        self.allow_blend_change = allow_blend_change
        self.phases = [BlendPhase(self.names, self.weights)]
        self.seq_len, self.seed = streams[0].seq_len, streams[0].seed

    @property
    def num_samples(self) -> int:
        """Samples in one pass over every source (what an "epoch" of the blend means in logs)."""
        return sum(s.num_samples for s in self.streams)

    @property
    def phase(self) -> BlendPhase:
        """The blend reading now."""
        return self.phases[-1]

    def batch(self, global_indices: range) -> Batch:
        """``(inputs, targets)`` of consecutive global samples (see :meth:`SampleStream.batch`)."""
        n, t = len(global_indices), self.seq_len
        inputs = np.empty((n, t), dtype=np.int64)
        targets = np.empty((n, t), dtype=np.int64)
        for row, (s, k) in enumerate(self.phase.assign(global_indices.start, n)):
            w = self.streams[s].sample(k)
            inputs[row] = w[:-1]
            targets[row] = w[1:]
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def counts_at(self, consumed: int) -> dict[str, int]:
        """Samples each source has given once ``consumed`` global samples are read."""
        return dict(zip(self.names, self.phase.counts_at(consumed), strict=True))

    def state_dict(self) -> list[dict]:
        """The blend phases (names, weights, first sample, each source's count at it)."""
        return [p.state_dict() for p in self.phases]

    def load_state_dict(self, saved: list[dict] | None, consumed: int) -> None:
        """Continue the saved phases; a different blend is refused unless ``allow_blend_change``, which starts a new
        phase at ``consumed`` where each kept source continues its count."""
        phases = ([BlendPhase.from_state_dict(p) for p in saved] if saved
                  else [BlendPhase(self.names if len(self.names) == 1 else ("<single source>",), (1.0,))])
        last = phases[-1]
        if len(last.names) == 1 and len(self.names) == 1 and (last.names == self.names or not self.allow_blend_change):
            # One source then and now (checkpoints from before blends too): whether it is the same data is the
            # data checksum's question (checkpoint.allow_data_change), not the blend's. Only an allowed blend
            # change to another source starts that source at its beginning (below).
            self.phases = [*phases[:-1], BlendPhase(self.names, self.weights, last.start, last.base)]
            return
        if last.same_blend(self.names, self.weights):
            self.phases = phases
            return
        if not self.allow_blend_change:
            refuse_blend_change(saved, self.names, self.weights, consumed)
        self.phases = [*phases, last.continued(self.names, self.weights, consumed)]
        logger.warning("blend changed at sample %d (data.allow_blend_change=true): [%s] -> [%s]; each source "
                       "continues where it stopped", consumed, last.describe(), self.phase.describe())


class BatchIterator:
    """Endless, resumable micro-batches of one data-parallel rank.

    Each step consumes ``micro_batch_size * dp_size`` global samples; rank ``r`` takes
    ``[consumed + r*mb, consumed + (r+1)*mb)``. The ranks of one step together cover a contiguous
    range, so any ``(micro_batch_size, dp_size)`` with the same product sees the same samples.
    """

    def __init__(self, stream: SampleStream | BlendedStream, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not a rank of dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.stream = stream
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed so far."""
        return self.consumed_samples / self.stream.num_samples

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = self.stream.batch(range(start, start + self.micro_batch_size))
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch

    def consumed_by_source(self) -> dict[str, int]:
        """Samples each source has given so far, over all ranks (one source: ``{}``)."""
        if not isinstance(self.stream, BlendedStream) or len(self.stream.names) == 1:
            return {}
        return self.stream.counts_at(self.consumed_samples)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the next batch: ``consumed_samples``, ``seed``, ``seq_len``, and
        for a blend its phases and each source's consumed samples."""
        state: dict[str, Any] = {"consumed_samples": self.consumed_samples, "seed": self.stream.seed,
                                 "seq_len": self.stream.seq_len}
        if isinstance(self.stream, BlendedStream):
            state["blend"] = self.stream.state_dict()
            state["consumed_by_source"] = self.stream.counts_at(self.consumed_samples)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a different seed, seq_len or blend would silently change the data order."""
        for key in ("seed", "seq_len"):
            mine = getattr(self.stream, key)
            if int(state[key]) != mine:
                raise ValueError(f"data state was saved with {key}={state[key]} but this run uses {key}={mine}; "
                                 f"resuming would change the data order (use the original {key}, or start fresh)")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        if isinstance(self.stream, BlendedStream):
            self.stream.load_state_dict(state.get("blend"), consumed)
        self.consumed_samples = consumed


AUTO_EVAL_SAMPLES = 512  # eval.samples=null: the whole split up to this many samples, else this many spread over it


class EvalSet:
    """The fixed samples one evaluation reads from one source: the same on every call, for every layout.

    ``num_samples`` windows evenly spaced over the (unshuffled) split, so a capped set still spans
    every part of it. Rank ``r`` of ``dp_size`` takes the contiguous share ``[r*n//dp, (r+1)*n//dp)`` in
    micro-batches (the last one may be short); the evaluator weights each batch by its size, so the
    mean is over exactly these samples whatever the micro-batch size and data-parallel size.
    """

    def __init__(self, view: SplitView, seq_len: int, num_samples: int):
        self.view = view
        self.stream = SampleStream(view.tokens, seq_len, shuffle=False, split=f"{view.role} split of {view.source}")
        available = self.stream.num_samples
        self.num_samples = min(int(num_samples), available)
        if self.num_samples < num_samples:
            logger.info("the %s has %d samples of %d tokens, fewer than the %d asked for; evaluating all of them",
                        self.stream.split, available, seq_len, num_samples)
        self.windows = (np.arange(self.num_samples, dtype=np.int64) * available) // self.num_samples

    @property
    def num_tokens(self) -> int:
        """Target tokens one evaluation of this set covers."""
        return self.num_samples * self.stream.seq_len

    def rank_batches(self, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
        """This rank's share in micro-batches of at most ``micro_batch_size`` samples."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not a rank of dp_size={dp_size}")
        n = self.num_samples
        mine = self.windows[dp_rank * n // dp_size : (dp_rank + 1) * n // dp_size]
        for start in range(0, len(mine), micro_batch_size):
            yield self.stream.batch(mine[start : start + micro_batch_size].tolist(), window_indices=True)


def eval_sample_count(samples: int | None, iters: int | None, global_batch_size: int, available: int) -> int:
    """Samples per source per evaluation: ``eval.samples``, else ``eval.iters`` global batches, else the
    whole split up to :data:`AUTO_EVAL_SAMPLES`."""
    if samples is not None:
        return int(samples)
    if iters is not None:
        return int(iters) * int(global_batch_size)
    return min(available, AUTO_EVAL_SAMPLES)


def train_streams(data: DataSources, seq_len: int, seed: int,
                  orders: Sequence[EpochOrder | None] | None = None) -> list[SampleStream]:
    """One shuffled stream per training source (``orders``: their cached epoch orders, None: in memory)."""
    orders = orders or [None] * len(data.train)
    return [SampleStream(v.tokens, seq_len, seed=seed, shuffle=True, split=f"train split of {v.source}", order=o)
            for v, o in zip(data.train, orders, strict=True)]


def build_train_iterator(data: DataSources, seq_len: int, micro_batch_size: int, seed: int,
                         dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                         allow_blend_change: bool = False,
                         orders: Sequence[EpochOrder | None] | None = None) -> BatchIterator:
    """Shuffled, resumable training micro-batches of one data-parallel rank over the training blend."""
    streams = train_streams(data, seq_len, seed, orders)
    for view, stream in zip(data.train, streams, strict=True):
        logger.debug("train source %s: %d tokens, %d samples of %d", view.source, stream.num_tokens,
                     stream.num_samples, seq_len)
    blended = BlendedStream(streams, [v.source for v in data.train], [v.weight for v in data.train],
                            allow_blend_change)
    return BatchIterator(blended, micro_batch_size, dp_rank, dp_size, consumed_samples)
