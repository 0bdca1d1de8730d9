"""prepare_epoch_orders on real ranks (gloo, 2 processes): the shuffle cache is built once per job, or once
per node when the cache is on node-local disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainrun.data.index_cache import CachedEpochOrder, prepare_epoch_orders
from trainrun.data.loader import epoch_permutation
from trainrun.distributed.env import DistEnv

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

WORLD = 2
IDENTITY = {"source_checksum": "ab" * 32, "split": "train", "seq_len": 16}
NUM_SAMPLES, SEED, EPOCHS = 50_000, 11, 2


def _worker(rank: int, tmp_path: Path, node_local: bool) -> None:
    # node_local: each rank plays a node of its own (local rank 0) with its own cache disk.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=WORLD)
    env = DistEnv(rank, 0 if node_local else rank, WORLD, torch.device("cpu"), "gloo", "test")
    built: list[int] = []
    write = CachedEpochOrder._write_epoch

    def counting(self: CachedEpochOrder, epoch: int) -> None:
        built.append(epoch)
        write(self, epoch)

    CachedEpochOrder._write_epoch = counting  # this process only: it was spawned
    try:
        root = tmp_path / (f"node{rank}" if node_local else "shared")
        order = CachedEpochOrder(root, IDENTITY, NUM_SAMPLES, SEED)
        prepare_epoch_orders([(order, EPOCHS)], env)
        first = list(built)
        prepare_epoch_orders([(CachedEpochOrder(root, IDENTITY, NUM_SAMPLES, SEED), EPOCHS)], env)
        same = all(np.array_equal(order.permutation(e), epoch_permutation(SEED, e, NUM_SAMPLES)) for e in range(EPOCHS))
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({
            "first": first, "second": built[len(first):], "same": same,
            "mapped": isinstance(order.permutation(0), np.memmap)}))
    finally:
        env.close()


def _launch(tmp_path: Path, node_local: bool) -> list[dict]:
    mp.spawn(_worker, args=(tmp_path, node_local), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_only_rank_0_builds_a_shared_cache(tmp_path: Path) -> None:
    results = _launch(tmp_path, node_local=False)
    assert results[0] == {"first": [0, 1], "second": [], "same": True, "mapped": True}
    assert results[1] == {"first": [], "second": [], "same": True, "mapped": True}


def test_each_node_builds_a_node_local_cache_once(tmp_path: Path) -> None:
    results = _launch(tmp_path, node_local=True)
    # Rank 1 is local rank 0 of a node that cannot see rank 0's disk: it builds its own copy, once.
    for r in range(WORLD):
        assert results[r] == {"first": [0, 1], "second": [], "same": True, "mapped": True}
    assert sorted(p.name for p in (tmp_path / "node1").rglob("*.npy")) == ["shuffle-e0.npy", "shuffle-e1.npy"]
