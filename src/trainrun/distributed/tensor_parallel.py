"""Tensor + sequence parallelism of the GPT on the ``tp`` mesh (Megatron-style, torchtitan's plan).

Inside a block, the fused wqkv and w1/w3 are column-parallel (each rank holds ``n_heads // tp`` query heads,
``n_kv_heads // tp`` key/value heads, the ones its query heads attend with, and ``ffn // tp`` hidden
units) and wo/w2 row-parallel; between the matmuls the residual stream is sharded along the sequence
(SequenceParallel norms), so the all-reduce of plain TP becomes an all-gather before attention/MLP and
a reduce-scatter after. The token embedding is row-parallel (vocab-sharded) with a sequence-sharded
output, and the output projection column-parallel with replicated logits, so the loss is computed
exactly as in one process (no loss_parallel: simpler, the price is one (B, T, V) all-gather per
micro-batch).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def _block_plan() -> dict:
    """Plan of one transformer block, keyed by submodule name."""
    return {
        "attention_norm": SequenceParallel(),
        # (x, rope): x arrives sequence-sharded and is gathered; the RoPE tables stay plain tensors.
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        # Megatron's layout: wqkv's rows are grouped by kv head, so an even row shard holds n_kv_heads/tp whole groups.
        "attention.wqkv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.w1": ColwiseParallel(),
        "mlp.w2": RowwiseParallel(output_layouts=Shard(1)),
        "mlp.w3": ColwiseParallel(),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard ``model`` (a GPT or a pipeline stage of one) over ``tp_mesh`` in place; returns it.

    Modules a pipeline stage deleted (None) are skipped. Attention derives its local head count
    from the projected size (``view(B, T, -1, q_per_kv + 2, head_dim)``), so it needs no change after sharding:
    wqkv's rows are in Megatron's layout (:mod:`trainrun.model.qkv`), [query heads, k, v] per kv group, and
    tp divides n_kv_heads, so rank r's shard is groups r*n_kv_heads/tp.. whole, its query heads with exactly
    the key/value heads they attend with.
    """
    tied = getattr(model.cfg, "tie_embeddings", False) and model.tok_embeddings is not None and model.output is not None
    top: dict = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate(), use_local_output=True)
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan = {k: v for k, v in _block_plan().items() if k != "mlp.w3" or block.mlp.w3 is not None}
        parallelize_module(block, tp_mesh, plan)
    if tied:
        # Both are Shard(0) over the vocabulary on the same mesh; sharding made two copies, re-tie them.
        model.output.weight = model.tok_embeddings.weight
    return model
