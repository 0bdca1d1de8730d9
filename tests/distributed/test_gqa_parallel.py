"""Grouped-query attention with Llama 3.1's RoPE scaling under FSDP, TP, PP and mixes (gloo, CPU), against one process.

The model of test_parallel.py with ``model.n_kv_heads=2`` (4 query heads: groups of 2) and
``model.rope_scaling.type=llama3`` with an original context shorter than ``data.seq_len`` (the scaled
angles are used). Under ``parallel.tp=2`` each rank holds 2 query heads and the 1 key/value head they
attend with; under FSDP each rank a slice of the fused ``wqkv`` rows; under PP each stage its blocks.
Losses, gradient norms and final weights must equal the one-process run's within
test_parallel.py's tolerances. A ``parallel.tp`` that does not divide ``n_kv_heads`` exits 2 on every rank.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.distributed.test_parallel import (
    LAYOUTS,
    TINY_PARALLEL,
    assert_matches_reference,
    single,
    spawn_ranks,
    torchrun,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GQA = ["model.n_kv_heads=2", "model.rope_scaling.type=llama3", "model.rope_scaling.original_max_position_embeddings=8"]


@pytest.fixture(scope="module")
def gqa_args(tmp_path_factory) -> list[str]:
    return [*TINY_PARALLEL, *GQA, f"data.path={tmp_path_factory.mktemp('gqa_corpus')}"]


@pytest.fixture(scope="module")
def gqa_reference(tmp_path_factory, gqa_args) -> Path:
    run_dir = tmp_path_factory.mktemp("gqa_reference") / "run"
    proc = single(run_dir, gqa_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


GQA_LAYOUTS = {name: LAYOUTS[name] for name in ("fsdp", "tp_sp", "pp_1f1b", "fsdp_x_tp", "pp_x_fsdp")}
"""Sharding by data (FSDP), by heads (TP: 2 query heads and their 1 kv head per rank), by layers (PP), and mixed."""


@pytest.mark.parametrize("layout", list(GQA_LAYOUTS))
def test_gqa_layout_matches_single_process(layout, gqa_reference, gqa_args, tmp_path):
    nproc, overrides = GQA_LAYOUTS[layout]
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = torchrun(nproc, run_dir, [*gqa_args, *overrides])
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = assert_matches_reference(run_dir, gqa_reference, f"{layout} gqa")
    assert expected["layers.0.attention.wqkv.weight"].shape == (64, 32)  # (4 q + 2 k + 2 v heads) of 8 channels
    print(f"gqa {layout}: {time.perf_counter() - start:.1f}s")


def test_tp_not_dividing_kv_heads_exits_2_on_every_rank(gqa_args, tmp_path):
    ranks = spawn_ranks(2, tmp_path / "run", [*gqa_args, "parallel.tp=2", "model.n_kv_heads=1"], timeout=90)
    for code, err in ranks:
        assert code == 2, err[-3000:]
        assert "parallel.tp=2: must divide model.n_kv_heads=1" in err and "Traceback" not in err
