"""Resume, exactly, across a blend (issue 18 §5): real processes, checked against one uninterrupted process.

A two-source blend (the bundled corpus's library and tests subsets, Megatron's ``data.split``)
trains for 6 steps in one process: the reference. The same run is then interrupted and resumed in
other layouts: 4 FSDP ranks -> 2 FSDP ranks -> 1 process (every hop reshards the checkpoint), and
2 "nodes" of one process each (two torchrun agents, static rendezvous on loopback) -> 1 node of two
processes -> 1 process. Every step's loss, the samples drawn from each source, the final parameters
and the data state each checkpoint records (consumed samples, blend phases, ``consumed_by_source``)
equal the reference's; tolerances are test_parallel's (same math, sums in another order).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.test_parallel import (
    PARAM_ATOL,
    TINY_PARALLEL,
    assert_same_losses,
    final_model_state,
    free_port,
    single,
    spawn_ranks,
    torchrun,
)
from tests.helpers.cli import cli_env, read_metrics, train_losses
from trainrun.checkpoint.layout import read_meta
from trainrun.data.blend import BlendPhase

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
GLOBAL_BATCH = 8  # TINY_PARALLEL's train.global_batch_size
BLEND = ("data.blend=[{name: lib, weight: 0.7, dataset: stdlib, subset: library}, "
         "{name: tst, weight: 0.3, dataset: stdlib, subset: tests}]")
BLEND_RUN = [*(a for a in TINY_PARALLEL if not a.startswith("train.max_steps=")), f"train.max_steps={STEPS}",
             BLEND, 'data.split="80,10,10"', "checkpoint.keep_last=0"]
"""TINY_PARALLEL over the 70/30 blend, 6 steps; every checkpoint kept (each hop's data state is compared)."""


@pytest.fixture(scope="session")
def blend_args(tmp_path_factory) -> list[str]:
    """BLEND_RUN plus a corpus cache built once (by the reference run)."""
    return [*BLEND_RUN, f"data.path={tmp_path_factory.mktemp('blend_corpus')}"]


@pytest.fixture(scope="session")
def blend_reference(tmp_path_factory, blend_args) -> Path:
    """One uninterrupted process, saving at steps 2, 4 and 6 (saving changes nothing it computes)."""
    run_dir = tmp_path_factory.mktemp("blend_reference") / "run"
    proc = single(run_dir, [*blend_args, "checkpoint.interval=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def data_state(run_dir: Path, step: int) -> dict:
    """The data position the checkpoint of ``step`` recorded (``meta["data"]`` of its trainrun.json)."""
    return read_meta(run_dir / "checkpoints" / f"step_{step}")["data"]


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training rows (those with a loss), in the order they were written."""
    return [row for row in read_metrics(run_dir) if "loss" in row]


def assert_continues_reference(run_dir: Path, reference: Path) -> None:
    """Every step ran once, with the reference's loss, per-source sample counts and final parameters."""
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # no step repeated or skipped on resume
    assert_same_losses(train_losses(run_dir), train_losses(reference))
    for row, expected in zip(rows, train_rows(reference), strict=True):
        assert (row["samples/lib"], row["samples/tst"]) == (expected["samples/lib"], expected["samples/tst"])
    expected_params, got = final_model_state(reference), final_model_state(run_dir)
    assert sorted(got) == sorted(expected_params)
    for name, tensor in expected_params.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=PARAM_ATOL, msg=lambda m, n=name: f"{n}: {m}")
    assert data_state(run_dir, STEPS) == data_state(reference, STEPS)


def assert_saved_at(run_dir: Path, reference: Path, step: int) -> None:
    """The checkpoint of ``step`` holds the reference's data state at that step, which is the blend's own count."""
    state = data_state(run_dir, step)
    assert state == data_state(reference, step)
    consumed = step * GLOBAL_BATCH
    assert state["consumed_samples"] == consumed
    counts = BlendPhase(("lib", "tst"), (0.7, 0.3)).counts_at(consumed)
    assert state["consumed_by_source"] == {"lib": counts[0], "tst": counts[1]}


def test_reference_checkpoints_record_the_blend(blend_reference):
    """The reference itself: its data state counts per source, its data checksum covers both sources and the split."""
    for step in (2, 4, 6):
        assert_saved_at(blend_reference, blend_reference, step)
    meta = read_meta(blend_reference / "checkpoints" / f"step_{STEPS}")
    assert meta["data"]["blend"] == [{"names": ["lib", "tst"], "weights": [0.7, 0.3], "start": 0, "base": [0, 0]}]
    assert sorted(meta["data_sources"]) == ["lib", "tst"]
    assert meta["data_checksum"] not in meta["data_sources"].values()  # not one source's directory checksum


def test_dp4_to_dp2_to_single_process_continues_the_blend(blend_reference, blend_args, tmp_path):
    """4 FSDP ranks save at step 2, 2 FSDP ranks resume and save at step 4, one process finishes: all resharded."""
    start = time.perf_counter()
    run_dir = tmp_path / "run"
    ranks = spawn_ranks(4, run_dir, [*blend_args, "parallel.dp_shard=4", "train.exit_interval=2"])
    assert [code for code, _ in ranks] == [3] * 4, ranks[0][1][-4000:]  # saved at step 2, "resume me"
    assert_saved_at(run_dir, blend_reference, 2)
    ranks = spawn_ranks(2, run_dir, [*blend_args, "parallel.dp_shard=2", "train.exit_interval=2"])
    assert [code for code, _ in ranks] == [3] * 2, ranks[0][1][-4000:]
    assert_saved_at(run_dir, blend_reference, 4)
    proc = single(run_dir, blend_args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (run_dir / "train.log").read_text()
    assert "step_2 (step 2)" in log and "step_4 (step 4)" in log  # "resumed from .../step_N (step N)"
    assert_continues_reference(run_dir, blend_reference)
    print(f"dp 4 -> 2 -> 1: {time.perf_counter() - start:.1f}s")


def torchrun_nodes(nnodes: int, run_dir: Path, overrides: list[str],
                   timeout: float = 180) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun agents of one process each, as on ``nnodes`` machines: ``--nnodes N --node-rank i``
    with static rendezvous at 127.0.0.1 (loopback only). Returns each agent's completed process."""
    port = free_port()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    agents = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--local-addr", "127.0.0.1", "-m", "trainrun", *overrides, f"hydra.run.dir={run_dir}"]
        agents.append(subprocess.Popen(cmd, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=cli_env(OMP_NUM_THREADS="1")))
    deadline, done = time.monotonic() + timeout, []
    try:
        for agent in agents:
            out, err = agent.communicate(timeout=max(deadline - time.monotonic(), 1))
            done.append(subprocess.CompletedProcess(agent.args, agent.returncode, out, err))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    return done


def test_two_nodes_to_one_node_to_single_process_continues_the_blend(blend_reference, blend_args, tmp_path):
    """2 nodes x 1 process save at step 2, 1 node x 2 processes resume and save at step 4, one process finishes."""
    start = time.perf_counter()
    run_dir = tmp_path / "run"
    agents = torchrun_nodes(2, run_dir, [*blend_args, "parallel.dp_shard=2", "train.exit_interval=2"])
    # Each worker exits 3 ("saved, resume me"); a torchrun agent reports a worker's nonzero exit as its own failure.
    for agent in agents:
        assert "exitcode  : 3" in agent.stderr or agent.returncode == 3, agent.stderr[-4000:]
    assert "world_size=2" in (run_dir / "train.log").read_text()
    assert_saved_at(run_dir, blend_reference, 2)
    proc = torchrun(2, run_dir, [*blend_args, "parallel.dp_replicate=2", "train.exit_interval=2"])
    assert "exitcode  : 3" in proc.stderr or proc.returncode == 3, proc.stderr[-4000:]
    assert_saved_at(run_dir, blend_reference, 4)
    proc = single(run_dir, blend_args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_continues_reference(run_dir, blend_reference)
    print(f"2 nodes -> 1 node -> 1 process: {time.perf_counter() - start:.1f}s")
