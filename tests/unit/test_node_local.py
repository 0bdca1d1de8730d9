"""Node-local checkpoints without processes: which step every rank can restore, replica placement, the
per-rank file format, and the refusals at start-up (the two-node runs: tests/distributed/test_local_checkpoints.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainrun.checkpoint.dcp_io import CheckpointMismatch
from trainrun.checkpoint.node_local import (
    NodeHoldings,
    RankPlace,
    StepFiles,
    Topology,
    plan_restore,
    restore,
    scan,
    to_bytes,
)
from trainrun.checkpoint.paths import check_non_persistent_dir
from trainrun.config.schema import CheckpointConfig
from trainrun.distributed.env import node_index
from trainrun.errors import CheckpointError, ConfigError

LAYOUT = {"dp_replicate": 1, "dp_shard": 4, "tp": 1, "pp": 1}
DIR = Path("/local/ckpt")


def _topo(nodes: int = 2, per_node: int = 2) -> Topology:
    return Topology([RankPlace(r, r // per_node, f"h{r // per_node}") for r in range(nodes * per_node)])


def _node(node: int, steps: dict[int, list[int]], exists: bool = True, world: int = 4,
          problems: list[str] = ()) -> NodeHoldings:
    return NodeHoldings(node, str(DIR), exists,
                        {s: StepFiles(ranks, float(s), world, LAYOUT, list(problems)) for s, ranks in steps.items()})


def test_the_newest_step_every_rank_holds_wins():
    plan, notes = plan_restore([_node(0, {3: [0, 1], 6: [0, 1]}), _node(1, {3: [2, 3], 6: [2, 3]})],
                               _topo(), 4, LAYOUT, DIR)
    assert plan.step == 6 and plan.path == DIR / "local_step_6" and notes == []
    assert plan.sources == {0: 0, 1: 0, 2: 1, 3: 1}  # every rank reads its own node's disk


def test_a_step_one_node_lacks_falls_back_to_an_older_common_one_naming_the_node():
    # Node 1 committed step 6 but node 0 did not (killed between the commits): step 3 is the agreed one.
    plan, notes = plan_restore([_node(0, {3: [0, 1]}), _node(1, {3: [2, 3], 6: [2, 3]})], _topo(), 4, LAYOUT, DIR)
    assert plan.step == 3
    assert notes == ["node-local step 6 cannot be restored: no node holds the files of rank(s) 0, 1 "
                     "(node 0 (host h0): no local_step_6 in /local/ckpt)"]


@pytest.mark.parametrize("wiped", ["gone", "empty", "incomplete"])
def test_a_wiped_node_without_replicas_leaves_no_plan_and_says_what_is_missing(wiped):
    node1 = {"gone": _node(1, {}, exists=False), "empty": _node(1, {}),
             "incomplete": _node(1, {6: [3]}, problems=["rank_2.pt is missing"])}[wiped]
    plan, notes = plan_restore([_node(0, {6: [0, 1]}), node1], _topo(), 4, LAYOUT, DIR)
    assert plan is None and len(notes) == 1
    assert "node 1 (host h1)" in notes[0] and "rank(s) 2" in notes[0]
    assert {"gone": "/local/ckpt does not exist", "empty": "holds no node-local checkpoint",
            "incomplete": "rank_2.pt is missing"}[wiped] in notes[0]


def test_a_replica_on_the_peer_node_restores_the_wiped_nodes_ranks():
    topo = _topo()
    assert [topo.replica_holders(r, 1) for r in range(4)] == [[2], [3], [0], [1]]  # ring: the next node
    plan, _ = plan_restore([_node(0, {6: [0, 1, 2, 3]}), _node(1, {})], topo, 4, LAYOUT, DIR)
    assert plan.step == 6 and plan.sources == {0: 0, 1: 0, 2: 0, 3: 0}
    assert [topo.reader(r, 0) for r in range(4)] == [0, 1, 0, 1]  # node 0's ranks read and send ranks 2 and 3


def test_ranks_that_moved_to_another_node_find_their_files_there():
    topo = Topology([RankPlace(0, 1, "b"), RankPlace(1, 0, "a")])  # a restart swapped the agents
    plan, _ = plan_restore([_node(0, {6: [0]}, world=2), _node(1, {6: [1]}, world=2)], topo, 2, LAYOUT, DIR)
    assert plan.sources == {0: 0, 1: 1}
    assert topo.reader(0, 0) == 1 and topo.reader(1, 1) == 0  # each sends the other its file


def test_another_world_size_or_layout_is_refused_with_the_reason():
    plan, notes = plan_restore([_node(0, {6: [0, 1]}, world=4), _node(1, {6: [2, 3]}, world=4)],
                               _topo(2, 1), 2, LAYOUT, DIR)
    assert plan is None and "saved by 4 ranks" in notes[0] and "same world size and layout" in notes[0]


def test_scan_verifies_each_file(tmp_path):
    from trainrun.checkpoint.layout import write_text_atomic

    step = tmp_path / "local_step_6"
    step.mkdir()
    (step / "rank_0.pt").write_bytes(b"x" * 10)
    (step / "rank_1.pt").write_bytes(b"y" * 9)  # truncated
    write_text_atomic(step / "node.json", '{"files": {"rank_0.pt": {"size": 10}, "rank_1.pt": {"size": 10}}, '
                      '"committed_unix": 1.0, "world_size": 2, "layout": {}}')
    (tmp_path / "local_step_3").mkdir()  # no node.json: a save killed before its commit cannot be listed
    found = scan(tmp_path, "size", node=0)
    assert found.steps[6].ranks == [0] and "rank_1.pt has 9 bytes, expected 10" in found.steps[6].problems[0]
    assert found.steps[3].ranks == [] and "node.json" in found.steps[3].problems[0]
    assert scan(tmp_path / "gone", "size", 0).exists is False


def test_a_ranks_state_round_trips_in_place_and_refuses_another_shape():
    model = torch.nn.Linear(4, 3)
    tensors = {"model": {"w": model.weight.detach(), "b": model.bias.detach()}, "rng": {"cpu": torch.get_rng_state()}}
    data = to_bytes(tensors, rank=1, step=6)
    saved_w = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    restore(tensors, data, rank=1, source="rank_1.pt")
    assert torch.equal(model.weight, saved_w)  # copied into the live tensor
    with pytest.raises(CheckpointError, match="rank 1's state, not rank 0's"):
        restore(tensors, data, rank=0, source="rank_1.pt")
    with pytest.raises(CheckpointMismatch, match="other shapes"):
        restore({"model": {"w": torch.zeros(5, 4)}}, data, rank=1, source="rank_1.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        restore(tensors, data[:50], rank=1, source="rank_1.pt")


def test_a_view_is_saved_without_the_storage_around_it():
    big = torch.zeros(1000)
    assert len(to_bytes({"w": big[:10]}, 0, 1)) < len(to_bytes({"w": big}, 0, 1)) / 2


def test_replicas_are_checked_against_the_number_of_nodes(tmp_path):
    check_non_persistent_dir(tmp_path / "fast", tmp_path / "ckpt", nodes=2, replicas=1)
    with pytest.raises(ConfigError, match=r"checkpoint.local_replicas.*at most the 1 other.*local_replicas<=1"):
        check_non_persistent_dir(tmp_path / "fast", tmp_path / "ckpt", nodes=2, replicas=2)
    with pytest.raises(ConfigError, match="checkpoint.local_replicas"):
        check_non_persistent_dir(tmp_path / "fast", tmp_path / "ckpt", nodes=1, replicas=1)
    with pytest.raises(ConfigError, match="non_persistent_interval>0"):
        CheckpointConfig(local_replicas=1).validate()
    with pytest.raises(ConfigError, match="checkpoint.local_replicas"):
        CheckpointConfig(local_replicas=-1, non_persistent_interval=5).validate()
    CheckpointConfig(local_replicas=1, non_persistent_interval=5).validate()


def test_node_index_comes_from_the_launcher(monkeypatch):
    for name in ("GROUP_RANK", "SLURM_NODEID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_index(5) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_index(5) == 2
    monkeypatch.setenv("SLURM_NODEID", "3")
    assert node_index(5) == 3
    monkeypatch.setenv("GROUP_RANK", "1")
    assert node_index(5) == 1
