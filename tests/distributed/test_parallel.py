"""Real multi-process runs (gloo, CPU) of the CLI through torchrun, checked against one process.

Every layout trains the same tiny model for 4 steps on the same global batches. Tolerance: the
layouts compute the same math, but sums run in a different order (FSDP reduce-scatter, TP partial
matmuls, pipeline micro-batches, all-reduce of gradients over ranks), so fp32 results differ in the
last bits; measured differences are ~1e-7 relative. ``rtol=1e-5`` on losses and ``atol=1e-5`` on
parameters (weights ~0.02, 4 AdamW steps of lr <= 1e-3) is tight enough to catch a wrong batch, a
missing all-reduce or a mis-scaled gradient (each moves the loss by >= 1e-3).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import cli_env, read_metrics, start_ranks, train_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY_PARALLEL = [
    "model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.tie_embeddings=false",
    "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=8", "data.max_documents=50",
    "train.max_steps=4", "train.log_interval=1", "train.progress_bar=false", "eval.interval=0",
    "eval.iters=2", "eval.sample_tokens=0", "checkpoint.interval=0", "optim.warmup_steps=1",
]
"""Small enough that a 4-process run takes seconds on 2 cores; tie_embeddings=false so that PP applies."""

LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, run_dir: Path, overrides: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m trainrun ...`` as a user types it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "trainrun", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout, check=False,
                          env=cli_env(OMP_NUM_THREADS="1"))


def spawn_ranks(nproc: int, run_dir: Path, overrides: list[str], timeout: float = 180) -> list[tuple[int, str]]:
    """Start ``nproc`` ranks with torchrun's environment variables but without torchrun.

    torchrun exits 1 when any rank fails and SIGTERMs the others, hiding their own exit codes;
    these tests need every rank's code (2: bad config, 3: saved, resume me). Returns
    ``(exit code, stderr)`` per rank; a rank still running after ``timeout`` (a hang) fails the test.
    """
    procs = start_ranks(nproc, [*overrides, f"hydra.run.dir={run_dir}"], run_dir.parent, free_port())
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def single(run_dir: Path, overrides: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The same CLI in one process (no torchrun variables)."""
    env = {k: v for k, v in cli_env(OMP_NUM_THREADS="1").items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "trainrun", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def final_model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of the run's newest checkpoint, read in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    out = run_dir / "final_full.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.fixture(scope="session")
def base_args(tmp_path_factory) -> list[str]:
    """TINY_PARALLEL plus a corpus cache built once (by the reference run)."""
    return [*TINY_PARALLEL, f"data.path={tmp_path_factory.mktemp('pcorpus')}"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, base_args) -> Path:
    """One uninterrupted single-process run: the losses and final weights every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = single(run_dir, base_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def grad_norms(run_dir: Path) -> list[float]:
    return [row["grad_norm"] for row in read_metrics(run_dir) if "grad_norm" in row]


def assert_same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=LOSS_RTOL, abs=0), f"step {step}"


def assert_matches_reference(run_dir: Path, reference: Path, label: str) -> dict[str, torch.Tensor]:
    """The run's losses, gradient norms and final parameters are the reference's; returns the reference's state.

    Prints ``equivalence <label>: max|dloss| .. max|dparam| ..`` (``pytest -s``): the equivalence table's row."""
    losses, expected_losses = train_losses(run_dir), train_losses(reference)
    assert_same_losses(losses, expected_losses)
    # The logged gradient norm is the global one (all shards, all stages), before clipping.
    assert grad_norms(run_dir) == pytest.approx(grad_norms(reference), rel=1e-4)
    expected, got = final_model_state(reference), final_model_state(run_dir)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=PARAM_ATOL, msg=lambda m, n=name: f"{n}: {m}")
    dloss = max(abs(losses[step] - loss) for step, loss in expected_losses.items())
    dparam = max((got[name] - tensor).abs().max().item() for name, tensor in expected.items())
    print(f"equivalence {label}: max|dloss| {dloss:.3g} max|dparam| {dparam:.3g} over {len(losses)} steps")
    return expected


PIPELINE = ["parallel.pp=2", "train.step_executor=pipeline"]
"""Two pipeline stages, run by the pipeline executor (no other executor accepts parallel.pp>1)."""

LAYOUTS = {
    "ddp": (2, ["parallel.dp_replicate=2"]),
    "fsdp": (2, ["parallel.dp_shard=2"]),
    "tp_sp": (2, ["parallel.tp=2"]),
    "pp_gpipe": (2, [*PIPELINE, "parallel.pp_schedule=GPipe"]),
    "pp_1f1b": (2, [*PIPELINE, "parallel.pp_schedule=1F1B", "parallel.pp_microbatches=4"]),
    "pp_interleaved": (2, [*PIPELINE, "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2"]),
    "hsdp": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    "fsdp_x_tp": (4, ["parallel.dp_shard=2", "parallel.tp=2", "parallel.activation_checkpointing=full"]),
    "pp_x_fsdp": (4, [*PIPELINE, "parallel.dp_shard=2", "parallel.activation_checkpointing=selective"]),
    "pp_x_ddp": (4, [*PIPELINE, "parallel.dp_replicate=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, base_args, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = torchrun(nproc, run_dir, [*base_args, *overrides])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_matches_reference(run_dir, reference, f"{layout} mha")
    log = (run_dir / "train.log").read_text()
    assert f"world_size={nproc}" in log
    print(f"{layout}: {time.perf_counter() - start:.1f}s")


@pytest.mark.parametrize(("first", "second"), [
    ((4, ["parallel.dp_shard=4"]), (2, ["parallel.tp=2"])),
    ((2, PIPELINE), (1, [])),
], ids=["dp_shard4_to_tp2", "pp2_to_single"])
def test_resume_in_another_layout_continues_the_run(first, second, reference, base_args, tmp_path):
    run_dir = tmp_path / "run"
    n1, o1 = first
    ranks = spawn_ranks(n1, run_dir, [*base_args, *o1, "train.exit_interval=2"])
    assert [code for code, _ in ranks] == [3] * n1, ranks[0][1][-4000:]  # saved at step 2, "resume me"
    n2, o2 = second
    args = [*base_args, *o2]
    proc = torchrun(n2, run_dir, args) if n2 > 1 else single(run_dir, args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert_same_losses(train_losses(run_dir), train_losses(reference))


@pytest.mark.parametrize(("nproc", "overrides", "message"), [
    (2, ["parallel.dp_shard=4"], "degrees multiply to 4 but the world size is 2"),
    (2, ["parallel.tp=2", "model.n_heads=1", "model.d_model=32"], "parallel.tp=2: must divide model.n_heads=1"),
    (2, ["parallel.pp=2", "model.n_layers=3"], "must divide model.n_layers=3"),
    (2, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=3"],
     "pp*pp_stages_per_rank=6 must divide model.n_layers=4"),
    (2, ["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings"),
])
def test_misconfiguration_exits_2_on_every_rank(nproc, overrides, message, base_args, tmp_path):
    start = time.perf_counter()
    ranks = spawn_ranks(nproc, tmp_path / "run", [*base_args, *overrides], timeout=90)
    for code, err in ranks:  # each rank says why and exits before any collective: nobody waits for a peer
        assert code == 2, err[-3000:]
        assert message in err and "Traceback" not in err
    assert time.perf_counter() - start < 60


def test_missing_rendezvous_variables_exit_2(base_args, tmp_path):
    env = {k: v for k, v in cli_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "trainrun", *base_args, "parallel.initializer=torchrun",
                           f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "MASTER_ADDR, MASTER_PORT are not set" in proc.stderr


def test_dry_run_reports_memory_per_layout(base_args, tmp_path):
    """A one-process dry run plans the layout it names: per-device model state shrinks with dp_shard*tp*pp."""
    def params_gib(run_dir: Path) -> float:
        line = next(x for x in (run_dir / "train.log").read_text().splitlines() if "params " in x and "GiB" in x)
        return float(line.split("params ")[1].split(" GiB")[0])

    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    big = ["+experiment=gpt_1b", "run.dry_run=true"]
    assert single(plain, big).returncode == 0
    proc = single(sharded, [*big, "parallel.dp_shard=8", "parallel.dp_replicate=2",
                            "parallel.activation_checkpointing=full"])
    assert proc.returncode == 0, proc.stderr
    log = (sharded / "train.log").read_text()
    assert "dp_replicate=2 dp_shard=8 tp=1 pp=1 (16 devices; activation checkpointing full)" in log
    assert params_gib(sharded) == pytest.approx(params_gib(plain) / 8, abs=0.01)
