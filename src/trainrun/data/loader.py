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
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from trainrun.data.datasets import TokenDataset
from trainrun.data.indexed import IndexedDataset
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


class BatchIterator:
    """Endless, resumable micro-batches of one data-parallel rank.

    Each step consumes ``micro_batch_size * dp_size`` global samples; rank ``r`` takes
    ``[consumed + r*mb, consumed + (r+1)*mb)``. The ranks of one step together cover a contiguous
    range, so any ``(micro_batch_size, dp_size)`` with the same product sees the same samples.
    """

    def __init__(self, stream: SampleStream, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0):
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

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue with the next batch: ``consumed_samples``, ``seed``, ``seq_len``."""
        return {"consumed_samples": self.consumed_samples, "seed": self.stream.seed, "seq_len": self.stream.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a different seed or seq_len would silently change the data order."""
        for key in ("seed", "seq_len"):
            mine = getattr(self.stream, key)
            if int(state[key]) != mine:
                raise ValueError(f"data state was saved with {key}={state[key]} but this run uses {key}={mine}; "
                                 f"resuming would change the data order (use the original {key}, or start fresh)")
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed}")
        self.consumed_samples = consumed


def val_batches(stream: SampleStream, micro_batch_size: int, num_batches: int, dp_rank: int = 0,
                dp_size: int = 1) -> Iterator[Batch]:
    """The first ``num_batches`` validation micro-batches of this rank, unshuffled.

    Batch ``k`` of rank ``r`` holds windows ``[(k*dp_size + r)*mb, ...+mb)``, wrapping around a
    small split, so every call (and every evaluation) sees exactly the same data.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not a rank of dp_size={dp_size}")
    mb = int(micro_batch_size)
    for k in range(num_batches):
        start = (k * dp_size + dp_rank) * mb
        yield stream.batch([i % stream.num_samples for i in range(start, start + mb)], window_indices=True)


def build_train_iterator(dataset: TokenDataset, seq_len: int, micro_batch_size: int, seed: int,
                         dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0) -> BatchIterator:
    """Shuffled, resumable training micro-batches of one data-parallel rank."""
    stream = SampleStream.from_indexed(dataset.train, seq_len, seed=seed, shuffle=True, split="train")
    logger.debug("train stream: %d tokens, %d samples of %d", stream.num_tokens, stream.num_samples, seq_len)
    return BatchIterator(stream, micro_batch_size, dp_rank, dp_size, consumed_samples)


def build_val_stream(dataset: TokenDataset, seq_len: int) -> SampleStream:
    """Unshuffled windows over the validation split, for :func:`val_batches`."""
    return SampleStream.from_indexed(dataset.val, seq_len, shuffle=False, split="val")
