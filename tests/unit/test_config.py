"""Config composition (every group option and experiment) and every validation rule."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from trainrun.config import ConfigError, TrainRunConfig, compose_config, validate_config
from trainrun.config.convert import config_dir

CONF = config_dir()

CONTRACT = {
    "run": ["seed", "dry_run", "device"],
    "model": ["n_layers", "n_heads", "d_model", "vocab_size", "max_seq_len"],
    "optim": ["lr", "weight_decay", "schedule", "warmup_steps", "decay_steps", "grad_clip"],
    "data": ["name", "path", "seq_len"],
    "train": ["max_steps", "micro_batch_size", "global_batch_size", "log_interval", "step_executor", "precision"],
    "eval": ["interval", "iters"],
    "parallel": ["initializer", "dp_replicate", "dp_shard", "tp", "pp"],
    "checkpoint": ["interval", "keep_last", "resume", "async_save"],
}


def test_contract_keys_exist():
    cfg = compose_config()
    for group, keys in CONTRACT.items():
        names = {f.name for f in fields(getattr(cfg, group))}
        assert set(keys) <= names, f"{group} lacks {set(keys) - names}"
    assert cfg.logging.wandb.enabled is False and cfg.logging.wandb.mode == "offline"
    assert isinstance(cfg.logging.tensorboard, bool)


def _group_options() -> list[tuple[str, str]]:
    return [(d.name, f.stem) for d in sorted(CONF.iterdir()) if d.is_dir() and d.name not in ("experiment", "hydra")
            for f in sorted(d.glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "indexed"):
        overrides.append("data.path=/somewhere")
    cfg = compose_config(overrides)
    assert isinstance(cfg, TrainRunConfig)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    validate_config(cfg, world_size=1)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_experiment_shapes():
    one_b = compose_config(["+experiment=gpt_1b"]).model
    assert (one_b.n_layers, one_b.d_model, one_b.n_heads) == (24, 2048, 16)
    small = compose_config(["+experiment=gpt_125m", "optim.lr=3e-4", "train.max_steps=50"])
    assert (small.model.n_layers, small.model.d_model, small.optim.lr, small.train.max_steps) == (12, 768, 3e-4, 50)
    validate_config(small, world_size=1)  # a short run of a long recipe ends inside warmup: allowed


def test_typo_fails_while_composing():
    with pytest.raises(Exception, match="max_stepz"):
        compose_config(["train.max_stepz=5"])


def _bad(**groups) -> TrainRunConfig:
    cfg = compose_config()
    return replace(cfg, **{g: replace(getattr(cfg, g), **kw) for g, kw in groups.items()})


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": {"n_heads": 5}}, "model.n_heads"),
    ({"model": {"norm": "batchnorm"}}, "model.norm"),
    ({"data": {"seq_len": 1024}}, "data.seq_len"),
    ({"train": {"global_batch_size": 20}}, "train.global_batch_size"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"train": {"step_executor": "warp"}}, "train.step_executor"),
    ({"model": {"name": "mamba"}}, "model.name"),
    ({"optim": {"schedule": "cyclic"}}, "optim.schedule"),
    ({"data": {"name": "indexed", "path": "/does/not/exist"}}, "data.path"),
    ({"parallel": {"tp": 2}}, "parallel"),
    ({"checkpoint": {"resume": "/no/such/ckpt"}}, "checkpoint.resume"),
    ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps"),
])
def test_validation_names_field(changes, field):
    with pytest.raises(ConfigError) as info:
        validate_config(_bad(**changes), world_size=1)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_unknown_component_lists_registered_names():
    with pytest.raises(ConfigError, match="registered: .*eager"):
        validate_config(_bad(train={"step_executor": "warp"}), world_size=1)


def test_conf_dir_is_the_checkout():
    assert (Path(CONF) / "config.yaml").is_file()


def test_every_config_field_has_a_docstring():
    from trainrun.config import schema
    from trainrun.config.reference import field_docs

    for cls in (schema.RunConfig, schema.ModelConfig, schema.OptimConfig, schema.DataConfig, schema.TrainConfig,
                schema.EvalConfig, schema.ParallelConfig, schema.CheckpointConfig, schema.WandbConfig,
                schema.LoggingConfig):
        missing = {f.name for f in fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_config_reference_is_current():
    from trainrun.config.reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == render() + "\n", "regenerate: python -m trainrun.config.reference > docs/config.md"
