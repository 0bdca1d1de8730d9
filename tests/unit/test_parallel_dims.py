"""ParallelDims without processes: validation and the rank arithmetic the data sharding relies on."""

from __future__ import annotations

import itertools

import pytest

from trainrun.config.schema import ParallelConfig
from trainrun.distributed.parallel_dims import ParallelDims
from trainrun.distributed.pipeline import stage_ids
from trainrun.errors import ConfigError


def test_degrees_must_multiply_to_world_size():
    from trainrun.config.schema import TrainRunConfig
    from trainrun.config.validate import validate_config

    with pytest.raises(ConfigError, match="degrees multiply to 4 but the world size is 2"):
        validate_config(TrainRunConfig(parallel=ParallelConfig(dp_shard=2, tp=2)), world_size=2)


@pytest.mark.parametrize(("pp", "rep", "shard", "tp"), [(2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 1, 2), (1, 1, 4, 2)])
def test_coordinates_follow_mesh_order(pp, rep, shard, tp):
    """Rank = ((pp_r*R + rep_r)*S + shard_r)*T + tp_r, the row-major order of init_device_mesh."""
    world = pp * rep * shard * tp
    coords = itertools.product(range(pp), range(rep), range(shard), range(tp))
    for rank, (p, r, s, t) in enumerate(coords):
        dims = ParallelDims(rep, shard, tp, pp, world, rank)
        assert (dims.pp_rank, dims.dp_rank, dims.tp_rank) == (p, r * shard + s, t)
    # TP and PP peers of one data-parallel rank read the same data: dp ranks cover 0..dp-1 evenly.
    dp_ranks = [ParallelDims(rep, shard, tp, pp, world, r).dp_rank for r in range(world)]
    assert sorted(set(dp_ranks)) == list(range(rep * shard))
    assert all(dp_ranks.count(d) == tp * pp for d in set(dp_ranks))


def test_pipeline_stage_placement_and_microbatches():
    assert stage_ids(1, 2, 2) == [1, 3]  # loop style: stage s on rank s % pp
    assert ParallelConfig(pp=2).pipeline_microbatches() == 2
    assert ParallelConfig(pp=2, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2).pipeline_microbatches() == 4
    assert ParallelConfig(pp=2, pp_microbatches=8).pipeline_microbatches() == 8


@pytest.mark.parametrize(("parallel", "model", "train", "message"), [
    ({"pp": 2, "pp_microbatches": 3}, {"tie_embeddings": False}, {}, "must divide the per-data-parallel-rank batch"),
    ({"pp": 2, "pp_schedule": "Interleaved1F1B"}, {"tie_embeddings": False}, {}, "at least 2 virtual stages"),
    ({"pp": 2}, {"tie_embeddings": False}, {"step_executor": "compile"}, "use train.step_executor=pipeline"),
    ({"pp": 2}, {"tie_embeddings": False}, {}, "eager.*splits it into stages"),
    ({"pp": 1}, {}, {"step_executor": "pipeline"}, "parallel.pp=1 makes none"),
    ({"tp": 2}, {"ffn_hidden": 33}, {}, "must divide the MLP hidden size 33"),
    ({"tp": 2}, {"position": "learned"}, {}, "rope positions only"),
])
def test_layout_errors_name_the_field(parallel, model, train, message):
    import dataclasses

    from trainrun.config.schema import ModelConfig, TrainConfig, TrainRunConfig
    from trainrun.config.validate import validate_config

    cfg = TrainRunConfig(parallel=ParallelConfig(**parallel), model=dataclasses.replace(ModelConfig(), **model),
                         train=dataclasses.replace(TrainConfig(), **train))
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, cfg.parallel.world_size)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pp_schedule", "ZeroBubble", "use one of GPipe, 1F1B, Interleaved1F1B"),
    ("activation_checkpointing", "some", "use one of none, selective, full"),
])
def test_layout_choices_are_enums(field, value, message):
    with pytest.raises(ConfigError, match=f"parallel.{field}='{value}': {message}"):
        ParallelConfig(**{field: value})
