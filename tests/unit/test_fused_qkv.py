"""The fused q/k/v projection ``attention.wqkv`` in Megatron's head-interleaved layout.

Per kv group g the rows are [the query heads of g, k_g, v_g]: the fuse/split helpers invert each other and
agree with the Hugging Face mapping's row table; an even row split (what ``ColwiseParallel`` does under
``parallel.tp``) holds whole groups, and attention computed shard by shard, each with its rows of wo, sums
to the unsharded output; a checkpoint of the older separate wq/wk/wv resumes (weights and optimizer state
fused on load; ``tests/unit/test_hf_export.py`` exports one).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.unit.test_checkpoint import _Iter
from trainrun.checkpoint.checkpointer import Checkpointer
from trainrun.checkpoint.dcp_io import load_tensors, read_tensor_metadata
from trainrun.checkpoint.separate_qkv import SeparateQkvCheckpoint, has_separate_qkv
from trainrun.checkpoint.store import CheckpointStore
from trainrun.config.schema import CheckpointConfig, ModelConfig, TrainRunConfig
from trainrun.errors import CheckpointMismatch
from trainrun.hf.mapping import export_targets, import_sources, qkv_segments
from trainrun.model.layers import Attention
from trainrun.model.qkv import fuse_qkv, split_qkv
from trainrun.optim import build_lr_scheduler
from trainrun.state import TrainState

SHAPES = [(4, 4), (4, 2), (4, 1), (8, 2)]  # (n_heads, n_kv_heads): MHA, GQA, MQA, groups of 4


def tiny(nh: int, nkv: int, **overrides) -> ModelConfig:
    return ModelConfig(**{"n_layers": 1, "d_model": 8 * nh, "n_heads": nh, "n_kv_heads": nkv, "max_seq_len": 32,
                          "vocab_size": 31, **overrides})


@pytest.mark.parametrize(("nh", "nkv"), SHAPES)
def test_fuse_split_round_trip_and_the_mapping_rows(nh, nkv):
    hs, c = 8, 5
    q, k, v = torch.randn(nh * hs, c), torch.randn(nkv * hs, c), torch.randn(nkv * hs, c)
    fused = fuse_qkv(q, k, v, nkv)
    assert fused.shape == ((nh + 2 * nkv) * hs, c)
    for a, b in zip(split_qkv(fused, nh, nkv), (q, k, v), strict=True):
        assert torch.equal(a, b)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], nkv)  # 1-D tensors too
    assert torch.equal(bias, fused[:, 0])
    per = nh // nkv
    for g in range(nkv):  # [q heads of g, k_g, v_g]
        block = fused[g * (per + 2) * hs:(g + 1) * (per + 2) * hs]
        assert torch.equal(block, torch.cat([q[g * per * hs:(g + 1) * per * hs], k[g * hs:(g + 1) * hs],
                                             v[g * hs:(g + 1) * hs]]))
    for part, tensor in zip("qkv", (q, k, v), strict=True):  # the mapping's pure-Python table says the same
        for fused_row, part_row, rows in qkv_segments(nh, nkv, hs)[part]:
            assert torch.equal(fused[fused_row:fused_row + rows], tensor[part_row:part_row + rows])


@pytest.mark.parametrize(("nh", "nkv", "tp"), [(4, 4, 2), (4, 2, 2), (8, 2, 2), (4, 4, 4)])
def test_tp_row_shard_holds_whole_groups_and_sums_to_the_output(nh, nkv, tp):
    torch.manual_seed(0)
    cfg = tiny(nh, nkv, position="learned")
    full = Attention(cfg).eval()
    hs = cfg.head_dim
    q, k, v = split_qkv(full.wqkv.weight, nh, nkv)
    x = torch.randn(2, 6, cfg.d_model)
    total = torch.zeros(2, 6, cfg.d_model)
    for r in range(tp):  # ColwiseParallel: an even split of wqkv's rows; RowwiseParallel: of wo's columns
        rows = full.wqkv.weight.chunk(tp, dim=0)[r]
        gq, gkv = nh // tp, nkv // tp  # this rank's query heads and kv heads: whole groups
        expected = fuse_qkv(q[r * gq * hs:(r + 1) * gq * hs], k[r * gkv * hs:(r + 1) * gkv * hs],
                            v[r * gkv * hs:(r + 1) * gkv * hs], gkv)
        assert torch.equal(rows, expected)
        shard = Attention(cfg).eval()
        shard.wqkv = torch.nn.Linear(cfg.d_model, rows.shape[0], bias=False)
        shard.wo = torch.nn.Linear(cfg.d_model // tp, cfg.d_model, bias=False)
        with torch.no_grad():
            shard.wqkv.weight.copy_(rows)
            shard.wo.weight.copy_(full.wo.weight.chunk(tp, dim=1)[r])
            total += shard(x, None) - (full.wo.bias if full.wo.bias is not None and r else 0)
    with torch.no_grad():
        torch.testing.assert_close(total, full(x, None), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("nh", "nkv"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_hf_mapping_covers_every_wqkv_row_once(nh, nkv, bias):
    cfg = tiny(nh, nkv, bias=bias)
    n = (nh + 2 * nkv) * cfg.head_dim
    sources = import_sources(cfg)["layers.0.attention.wqkv.weight"]
    covered = sorted(row for s in sources for row in range(s.start, s.start + s.rows))
    assert covered == list(range(n))
    assert {s.hf_name for s in sources} == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    if nkv == nh:
        gpt2 = tiny(nh, nkv, bias=bias, position="learned", mlp="gelu", norm="layernorm")
        [c_attn] = [t for t in export_targets(gpt2) if t.hf_name == "transformer.h.0.attn.c_attn.weight"]
        assert sum(b - a for a, b in c_attn.ranges) == n and c_attn.transpose


def _old_checkpoint(path, missing: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint as trainrun wrote it before the fusion: separate wq/wk/wv entries (4 query heads, 2 kv
    heads of 8 channels); returns them."""
    rows = {"wq": 32, "wk": 16, "wv": 16}
    entries = {f"layers.0.attention.{w}.weight": torch.randn(n, 32) for w, n in rows.items() if w != missing}
    dcp.save({"model": entries}, checkpoint_id=str(path))
    return entries


def test_load_tensors_reads_an_old_checkpoint_as_the_fused_layout(tmp_path):
    old = _old_checkpoint(tmp_path / "step")
    target = {"model": {"layers.0.attention.wqkv.weight": torch.empty(64, 32)}}
    load_tensors(tmp_path / "step", target, qkv_groups=2)
    expected = fuse_qkv(*(old[f"layers.0.attention.{w}.weight"] for w in ("wq", "wk", "wv")), 2)
    assert torch.equal(target["model"]["layers.0.attention.wqkv.weight"], expected)


def test_old_checkpoint_fusing_to_another_shape_is_a_mismatch_not_a_damaged_checkpoint(tmp_path):
    _old_checkpoint(tmp_path / "step")  # q 32 + k 16 + v 16 rows
    with pytest.raises(CheckpointMismatch, match=r"make model.layers.0.attention.wqkv.weight of shape \[64, 32\]"):
        load_tensors(tmp_path / "step", {"model": {"layers.0.attention.wqkv.weight": torch.empty(48, 32)}},
                     qkv_groups=2)


@pytest.mark.parametrize(("missing", "groups"), [("", None), ("wk", 2)], ids=["no_groups_given", "wk_missing"])
def test_old_checkpoint_that_cannot_be_read_as_fused_is_refused_with_one_line(tmp_path, missing, groups):
    _old_checkpoint(tmp_path / "step", missing)
    with pytest.raises(SeparateQkvCheckpoint) as err:
        load_tensors(tmp_path / "step", {"model": {"layers.0.attention.wqkv.weight": torch.empty(64, 32)}},
                     qkv_groups=groups)
    text = str(err.value)
    assert "\n" not in text and "attention.wq/wk/wv" in text and "trainrun-export" in text


def _checkpointer(tmp_path, projections: tuple[str, ...], **ckpt):
    """A Checkpointer over a model whose parameters are named as a block's attention projections."""
    cfg = TrainRunConfig(model=ModelConfig(d_model=8, vocab_size=16),
                         checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), **ckpt))
    # d_model 8, 4 heads of 2 channels (kv_heads 4): wqkv has 8 + 2*8 rows
    attention = torch.nn.ModuleDict({name: torch.nn.Linear(8, 24 if name == "wqkv" else 8) for name in projections})
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({"0": torch.nn.ModuleDict({"attention": attention})})})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, 100)
    store = CheckpointStore(tmp_path / "ckpt", cfg.checkpoint.keep_last, True, lambda: None, cfg.checkpoint.verify)
    return Checkpointer(cfg, store, [model], [optimizer], scheduler, _Iter(), TrainState(), torch.device("cpu"))


def _trained(checkpointer: Checkpointer) -> None:
    """One AdamW step on random gradients, so the optimizer holds state to save."""
    (model,), (optimizer,) = checkpointer.model_parts, checkpointer.optimizers
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    checkpointer.state.step = 1


@pytest.mark.parametrize("load_optimizer", [True, False])
def test_resume_of_an_old_separate_qkv_checkpoint_fuses_weights_and_optimizer_state(tmp_path, load_optimizer):
    old = _checkpointer(tmp_path, ("wq", "wk", "wv"))
    _trained(old)
    old.save()
    new = _checkpointer(tmp_path, ("wqkv",), load_optimizer=load_optimizer)
    assert new.resume() is not None
    groups = new.cfg.model.kv_heads
    old_attention = old.model_parts[0]["layers"]["0"]["attention"]
    wqkv = new.model_parts[0]["layers"]["0"]["attention"]["wqkv"]
    for kind in ("weight", "bias"):
        parts = [getattr(old_attention[w], kind) for w in ("wq", "wk", "wv")]
        assert torch.equal(getattr(wqkv, kind), fuse_qkv(*parts, groups))
        if load_optimizer:
            state = new.optimizers[0].state[getattr(wqkv, kind)]
            old_states = [old.optimizers[0].state[p] for p in parts]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key], fuse_qkv(*(s[key] for s in old_states), groups)), key
            assert float(state["step"]) == 1.0
    if load_optimizer:
        assert new.optimizers[0].param_groups[0]["lr"] == old.optimizers[0].param_groups[0]["lr"]
    new.state.step = 2
    saved = new.save(blocking=True)  # the next save writes the fused layout
    assert not has_separate_qkv(read_tensor_metadata(saved))
