"""Node-local (non-persistent) checkpoints on two emulated nodes: resume, a wiped node, a replica.

Two torchrun agents (``--nnodes=2 --nproc-per-node=1``, c10d rendezvous on 127.0.0.1), each started
in its own mount namespace where its own folder (``nodeK/``, its "disk") is bind-mounted at one common
path (``local/``): both see ``checkpoint.non_persistent_dir=<base>/local/ckpt`` and write to different
disks, as on two machines with a node-local SSD each. Rendezvous gives the agents their node index in
join order, so which disk rank 0 lands on varies between starts, as it may on a real cluster.

The first start trains 7 of 12 steps (``optim.decay_steps`` fixed, so the LR schedule is the one of the
12-step run) without a final save: persistent ``step_4`` (checkpoint.interval=4) and node-local step 6
(non_persistent_interval=3) remain, as after a crash at step 7. Losses after a resume must be bit-exact
with an uninterrupted 12-step run on the same two nodes (JSON floats round-trip exactly).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, cli_env
from tests.helpers.faults import losses
from trainrun.checkpoint.paths import non_persistent_dir
from trainrun.config.schema import TrainRunConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 12
ARGS = [*TINY, "model.n_layers=1", "model.d_model=32", "train.log_interval=1", "eval.interval=0",
        "eval.sample_tokens=0", "optim.decay_steps=20", "parallel.dp_shard=2", "checkpoint.keep_last=0",
        "checkpoint.save_final=false"]
"""A tiny model sharded by FSDP over the two nodes (so each node's files hold DTensor shards)."""


def _run_folder(case: Path) -> str:
    """The run's own folder in checkpoint.non_persistent_dir (``run-<hash of its run dir>``)."""
    cfg = TrainRunConfig()
    cfg.checkpoint.non_persistent_dir = "ckpt"
    return non_persistent_dir(cfg, case / "run").name


def _on_disk(case: Path, node: int) -> Path:
    """The run's node-local folder on node ``node``'s disk."""
    return case / f"node{node}" / "ckpt" / _run_folder(case)


def _as_seen(case: Path) -> Path:
    """The same folder as trainrun names it (the common path, each node's own disk)."""
    return case / "local" / "ckpt" / _run_folder(case)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mounts_work(tmp: Path) -> bool:
    (tmp / "a").mkdir(exist_ok=True)
    (tmp / "b").mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount --bind {tmp / 'a'} {tmp / 'b'}"], capture_output=True)
    return probe.returncode == 0


def run_two_nodes(base: Path, run_dir: Path, *extra: str, steps: int) -> list[str]:
    """Train on two emulated nodes until both agents exit; return each agent's output (both must exit 0)."""
    (base / "local").mkdir(parents=True, exist_ok=True)
    port, procs, outs = _free_port(), [], []
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(run_dir.glob("node0-*.out")))
    for node in range(2):
        disk = base / f"node{node}"
        disk.mkdir(exist_ok=True)
        out = run_dir / f"node{node}-{n}.out"
        outs.append(out)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh", str(disk), str(base / "local"),
               sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=local-ckpt", "--max-restarts=0", "-m", "trainrun", *ARGS,
               f"train.max_steps={steps}", f"hydra.run.dir={run_dir}",
               "checkpoint.non_persistent_dir=" + str(base / "local" / "ckpt"), *extra]
        with open(out, "w") as fh:
            procs.append(subprocess.Popen(cmd, cwd=run_dir, stdout=fh, stderr=subprocess.STDOUT,
                                          env=cli_env(OMP_NUM_THREADS="1")))
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    texts = [out.read_text() for out in outs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    return texts


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("nodes")
    if not _mounts_work(base):
        pytest.skip("needs mount namespaces (root, unshare --mount) to give each emulated node its own disk")
    return base


@pytest.fixture(scope="module")
def reference(base, corpus_cache) -> dict[int, float]:
    """Losses of an uninterrupted 12-step run on the same two nodes (no non-persistent checkpoints)."""
    run_dir = base / "reference"
    run_two_nodes(base / "ref-disks", run_dir, f"data.path={corpus_cache}", "checkpoint.interval=0", steps=STEPS)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def _first_start(case: Path, corpus: Path, *extra: str) -> list[str]:
    """7 steps: persistent step_4, node-local step 6 on both disks, then the end without a final save."""
    args = [f"data.path={corpus}", "checkpoint.interval=4", "checkpoint.non_persistent_interval=3", *extra]
    run_two_nodes(case, case / "run", *args, steps=7)
    assert sorted(p.name for p in (case / "run" / "checkpoints").glob("step_*")) == ["step_4"]
    for node in range(2):
        held = sorted(p.name for p in _on_disk(case, node).glob("*step_*"))
        assert held == ["local_step_6"], held  # only the newest is kept
    return args


def _resumed_from(run_dir: Path) -> str:
    log = (run_dir / "train.log").read_text()
    return log[log.rindex("resumed from "):].splitlines()[0]


def test_two_nodes_resume_from_their_local_checkpoints(base, corpus_cache, reference):
    case = base / "resume"
    args = _first_start(case, corpus_cache)
    run_two_nodes(case, case / "run", *args, steps=STEPS)
    assert f"resumed from {_as_seen(case) / 'local_step_6'} (step 6)" in _resumed_from(case / "run")
    assert losses(case / "run") == reference


def test_a_wiped_node_makes_every_rank_fall_back_to_the_persistent_checkpoint(base, corpus_cache, reference):
    case = base / "wiped"
    args = _first_start(case, corpus_cache)
    shutil.rmtree(_on_disk(case, 1))  # node 1 replaced: its local disk is empty
    texts = run_two_nodes(case, case / "run", *args, steps=STEPS)
    assert f"resumed from {case / 'run' / 'checkpoints' / 'step_4'} (step 4)" in _resumed_from(case / "run")
    log = (case / "run" / "train.log").read_text()
    assert "node-local step 6 cannot be restored" in log, log[-3000:]
    # Rendezvous numbers the agents in join order: the wiped disk is node 0 or node 1 of this start.
    assert re.search(rf"node \d \(host [^)]+\): {_as_seen(case)} holds no node-local checkpoint", log)
    assert losses(case / "run") == reference, texts[0][-2000:]


def test_a_replica_restores_the_wiped_nodes_shards(base, corpus_cache, reference):
    case = base / "replica"
    args = _first_start(case, corpus_cache, "checkpoint.local_replicas=1")
    for node in range(2):  # each disk holds both ranks' files: its own and its peer's copy
        assert sorted(p.name for p in (_on_disk(case, node) / "local_step_6").glob("rank_*.pt")) == [
            "rank_0.pt", "rank_1.pt"]
    shutil.rmtree(_on_disk(case, 1))
    run_two_nodes(case, case / "run", *args, steps=STEPS)
    assert f"resumed from {_as_seen(case) / 'local_step_6'} (step 6)" in _resumed_from(case / "run")
    assert losses(case / "run") == reference
    for node in range(2):  # the next node-local save (step 9; 12 is persistent) went to both disks again
        assert sorted(p.name for p in _on_disk(case, node).glob("*step_*")) == ["local_step_9"]
