"""A run whose checkpoint trainrun wrote before q/k/v were fused resumes as if it had never stopped.

A real run (GQA: 4 query heads, 2 kv heads) saves at step 2 and exits 3; its checkpoint is then rewritten
in the layout trainrun used before ``attention.wqkv`` existed: each block's wq/wk/wv weights and their
AdamW ``exp_avg``/``exp_avg_sq``/``step`` as separate entries, and the param-group settings in
``trainrun.json`` under the separate names. Resuming it, in one process and under
``parallel.dp_shard=2`` and ``parallel.pp=2`` (each rank reads only its own entries),
must give steps 3-4 the losses of the uninterrupted run, and the next save is in the fused layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.distributed.test_parallel import torchrun
from tests.helpers.cli import cli_env, run_cli, train_losses
from trainrun.checkpoint.dcp_io import read_tensor_metadata
from trainrun.checkpoint.layout import CheckpointDir, read_meta
from trainrun.checkpoint.separate_qkv import has_separate_qkv
from trainrun.model.qkv import split_qkv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N_HEADS, N_KV_HEADS, STEPS, SAVED = 4, 2, 4, 2
ARGS = [
    "model.n_layers=2", "model.d_model=32", f"model.n_heads={N_HEADS}", f"model.n_kv_heads={N_KV_HEADS}",
    "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=8", "data.max_documents=50",
    f"train.max_steps={STEPS}", "train.log_interval=1", "train.progress_bar=false", "eval.interval=0",
    "eval.sample_tokens=0", "checkpoint.interval=0", "optim.warmup_steps=1", "model.tie_embeddings=false",
]
"""Untied, so that pipeline parallelism applies."""
LAYOUTS = {"one_process": (1, []), "dp_shard2": (2, ["parallel.dp_shard=2"]),
           "pp2": (2, ["parallel.pp=2", "train.step_executor=pipeline"])}


def cli(run_dir: Path, args: list[str]):
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, timeout=180,
                   env=cli_env(OMP_NUM_THREADS="1"))


def _separate(name: str) -> list[str]:
    return [name.replace(".attention.wqkv.", f".attention.{w}.") for w in ("wq", "wk", "wv")]


def rewrite_with_separate_qkv(step_dir: Path) -> None:
    """Rewrite the committed checkpoint ``step_dir`` as trainrun wrote it before the fusion (and commit it)."""
    stored = read_tensor_metadata(step_dir)
    full = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype) for key, md in stored.items()}
    dcp.load(full, checkpoint_id=str(step_dir), no_dist=True)
    old: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        if ".attention.wqkv." not in key:
            old[key] = value
            continue
        parts = split_qkv(value, N_HEADS, N_KV_HEADS) if value.dim() else (value,) * 3
        old.update({name: part.clone() for name, part in zip(_separate(key), parts, strict=True)})
    meta = read_meta(step_dir)
    values = {}
    for key, value in meta["optim_values"].items():
        values.update({name: value for name in _separate(key)} if ".attention.wqkv." in key else {key: value})
    meta["optim_values"] = values
    directory = CheckpointDir(step_dir.parent)
    shutil.rmtree(step_dir)
    tmp = directory.prepare_tmp(SAVED)
    dcp.save(old, checkpoint_id=str(tmp), no_dist=True)
    directory.commit(SAVED, tmp, meta)
    assert has_separate_qkv(read_tensor_metadata(step_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qkv_corpus")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("qkv_reference") / "run"
    proc = cli(run_dir, [*ARGS, f"data.path={corpus}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train_losses(run_dir)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_with_separate_qkv_resumes_with_the_uninterrupted_losses(layout, reference, corpus, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.path={corpus}"]
    stopped = cli(run_dir, [*args, f"train.exit_interval={SAVED}"])
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    rewrite_with_separate_qkv(run_dir / "checkpoints" / f"step_{SAVED}")
    resumed = cli(run_dir, args) if nproc == 1 else torchrun(nproc, run_dir, [*args, *overrides])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # rank 0 logs what it read: 2 blocks (under PP its stage's 1) x (weight, AdamW step, exp_avg, exp_avg_sq)
    read = 4 if layout == "pp2" else 8
    log = (run_dir / "train.log").read_text()
    assert f"read {read} entries of separate attention.wq/wk/wv as attention.wqkv" in log
    losses = train_losses(run_dir)
    for step in range(SAVED + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), f"step {step}"
    final = run_dir / "checkpoints" / f"step_{STEPS}"
    assert not has_separate_qkv(read_tensor_metadata(final))  # written fused from then on
