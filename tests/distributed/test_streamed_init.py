"""Initialisation parameter by parameter from rank 0 (real gloo process groups, 2 ranks).

``parallelize`` applies the model's ``init_plan`` one parameter at a time: rank 0 draws each full
parameter and sends it to its owners, and no process builds the full model (``build_full`` here
raises if called). Every rank's shards, gathered, must equal bit for bit the weights of a one-process
``materialize`` from the same seed, under FSDP, TP+SP and PP, with tied and untied embeddings, with
and without grouped-query attention. The path for a model without a plan (rank 0 builds it in full)
gives the same weights too.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from trainrun import registry
from trainrun.config import compose_config
from trainrun.distributed.env import DistEnv
from trainrun.distributed.initializers import seed_everything
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.model import materialize

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

WORLD = 2
SEED = 1234
MODEL = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.vocab_size=97", "model.max_seq_len=16",
         "data.seq_len=16", "train.micro_batch_size=2", "train.global_batch_size=8", f"run.seed={SEED}"]
CASES = {
    "fsdp_tied": ["parallel.dp_shard=2", "model.tie_embeddings=true", "model.norm=layernorm", "model.bias=true"],
    "fsdp_gqa": ["parallel.dp_shard=2", "model.n_kv_heads=2"],
    "tp_sp_gqa": ["parallel.tp=2", "model.n_kv_heads=2", "model.tie_embeddings=true"],
    "pp": ["parallel.pp=2", "train.step_executor=pipeline", "model.tie_embeddings=false"],
    "fsdp_without_plan": ["parallel.dp_shard=2"],
}


def _meta_model(cfg):
    with torch.device("meta"):
        return registry.MODELS.get(cfg.model.name)(cfg.model)


def _worker(rank: int, tmp_path: Path, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=WORLD)
    env, clean = DistEnv(rank, rank, WORLD, torch.device("cpu"), "gloo", "test"), False
    try:
        parallelize = importlib.import_module("trainrun.distributed.parallelize")
        cfg = compose_config([*MODEL, *CASES[case]])
        dims = ParallelDims.from_config(cfg.parallel, WORLD, rank)
        dims.build_mesh("cpu")
        seed_everything(SEED)

        def build_full():
            if case != "fsdp_without_plan":
                raise AssertionError("rank 0 built the full model although it has an init_plan")
            return materialize(_meta_model(cfg), "cpu")

        if case == "fsdp_without_plan":
            parallelize.init_plan_of = lambda model: None
        parts = parallelize.parallelize(_meta_model(cfg), cfg, dims, torch.device("cpu"), build_full).parts
        state = {}
        for part in parts:
            for name, param in part.named_parameters():
                full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
                state[parallelize.unwrapped_name(name)] = full.clone()
        torch.save(state, tmp_path / f"rank{rank}.pt")
        del parts, state, full, param  # DTensors hold the mesh's groups: let close() collect them first
        clean = True
    finally:
        env.close(clean)  # a barrier first: no rank tears down its connections while a peer still uses them


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_init_equals_one_process(case, tmp_path):
    mp.spawn(_worker, args=(tmp_path, case), nprocs=WORLD, join=True)
    cfg = compose_config([*MODEL, *CASES[case]])
    seed_everything(SEED)
    expected = materialize(_meta_model(cfg), "cpu").state_dict()
    seen: set[str] = set()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, tensor in got.items():
            assert torch.equal(tensor, expected[name]), f"rank {rank}: {name} differs from one process"
        seen |= set(got)
    tied = {"output.weight"} if cfg.model.tie_embeddings else set()
    assert seen | tied == set(expected)  # every parameter is held somewhere (PP: each stage its own)
