"""Config composition (every group option, experiment and debug preset), Enum choices, every validation
rule, and the config package's place at the bottom of the dependency graph."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

import trainrun.__main__ as cli
from trainrun.config import ConfigError, TrainRunConfig, choices, compose_config, schema, validate_config
from trainrun.config.convert import config_dir
from trainrun.exit_codes import ExitCode

CONF = config_dir()
SRC = Path(cli.__file__).resolve().parent

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


# --- every option of every group -------------------------------------------------------------------


def _group_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file under conf/ except hydra's own groups; nested folders are
    options with a path (experiment=base/gpt3)."""
    found = []
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        for f in sorted(group_dir.rglob("*.yaml")):
            found.append((group_dir.name, f.relative_to(group_dir).with_suffix("").as_posix()))
    return found


def test_every_slot_group_has_options():
    groups = {g for g, _ in _group_options()}
    assert {"model", "data", "train", "parallel", "checkpoint", "logging", "paths", "experiment", "debug",
            "local"} <= groups


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "indexed"):
        overrides.append(f"data.path={tmp_path}")  # composes; the dataset check is tested in test_data
    cfg = compose_config(overrides)
    assert isinstance(cfg, TrainRunConfig)
    if (group, option) != ("data", "indexed"):
        validate_config(cfg, world_size=cfg.parallel.world_size)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("spelling", ["experiment", "+experiment"])
def test_every_experiment_composes_and_validates(experiment, spelling):
    cfg = compose_config([f"{spelling}={experiment}"])
    validate_config(cfg, world_size=1)
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_gpt3_experiments_share_one_recipe_and_differ_in_shape_and_lr():
    shapes = {}
    for name in ("gpt_125m", "gpt_350m", "gpt_1b"):
        cfg = compose_config([f"experiment={name}"])
        shapes[name] = (cfg.model.n_layers, cfg.model.n_heads, cfg.model.d_model, cfg.optim.lr)
        assert (cfg.model.norm, cfg.model.position, cfg.model.mlp, cfg.model.bias) == (
            "layernorm", "learned", "gelu", True)
        assert (cfg.data.seq_len, cfg.optim.warmup_steps, cfg.train.precision) == (2048, 375, "bf16")
        assert len((CONF / "experiment" / f"{name}.yaml").read_text().splitlines()) <= 10
    assert shapes == {"gpt_125m": (12, 12, 768, 6e-4), "gpt_350m": (24, 16, 1024, 3e-4), "gpt_1b": (24, 16, 2048, 2e-4)}
    small = compose_config(["+experiment=gpt_125m", "optim.lr=3e-4", "train.max_steps=50"])
    assert (small.optim.lr, small.train.max_steps) == (3e-4, 50)  # the command line wins over the experiment
    validate_config(small, world_size=1)  # a short run of a long recipe ends inside warmup: allowed


def test_debug_presets():
    fast = compose_config(["debug=fast"])
    assert fast.train.max_steps <= 5 and fast.eval.sample_tokens == 0 and fast.eval.iters == 1
    overfit = compose_config(["debug=overfit"])
    assert overfit.debug.overfit_batches == 1 and overfit.train.global_batch_size == overfit.train.micro_batch_size
    assert compose_config(["debug=profile"]).debug.profile_steps > 0
    nan = compose_config(["debug=nan"])  # a bare nan is a float to Hydra: trainrun reads it as the preset
    assert nan.debug.inject_nan_at_steps and max(nan.debug.inject_nan_at_steps) <= nan.train.max_steps
    assert "inject_nan_at_steps" not in {f.name for f in fields(schema.TrainConfig)}
    # debug comes last in the defaults list: it wins over an experiment
    assert compose_config(["experiment=gpt_125m", "debug=fast"]).train.max_steps == fast.train.max_steps


def test_logging_backends_select_as_a_list():
    default = compose_config()
    assert (default.logging.console, default.logging.jsonl, default.logging.tensorboard,
            default.logging.wandb.enabled) == (True, True, False, False)
    both = compose_config(["logging=[default,wandb,tensorboard]"])
    assert both.logging.wandb.enabled and both.logging.tensorboard and both.logging.console and both.logging.jsonl
    assert both.logging.wandb.mode == "offline"


def test_paths_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TRAINRUN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_config()
    assert cfg.paths.cache_dir == str(tmp_path / "cache") and cfg.data.path == cfg.paths.cache_dir
    monkeypatch.delenv("TRAINRUN_CACHE_DIR")
    assert compose_config().paths.cache_dir == "~/.cache/trainrun"


def test_local_settings_are_optional_and_git_ignored():
    assert not (CONF / "local" / "default.yaml").exists() or "conf/local/default.yaml" in _gitignore()
    assert "conf/local/default.yaml" in _gitignore()


def _gitignore() -> str:
    return (Path(__file__).resolve().parents[2] / ".gitignore").read_text()


def test_typo_fails_while_composing():
    with pytest.raises(Exception, match="max_stepz"):
        compose_config(["train.max_stepz=5"])


# --- Enum fields: discovered from the schema, each rejected while composing ----------------------------


def _enum_fields() -> list[tuple[str, type[Enum]]]:
    found = []

    def walk(cls: type, prefix: str) -> None:
        for name, enum_type in choices.enum_fields(cls).items():
            found.append((f"{prefix}{name}", enum_type))
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")

    walk(TrainRunConfig, "")
    return found


ENUM_FIELDS = _enum_fields()


def test_enum_fields_are_discovered():
    names = {name for name, _ in ENUM_FIELDS}
    assert {"model.norm", "model.position", "model.mlp", "train.precision", "parallel.pp_schedule",
            "parallel.activation_checkpointing", "optim.implementation", "logging.wandb.mode", "run.device",
            "checkpoint.verify", "checkpoint.exit_signals", "logging.level"} <= names


def _bad_override(name: str, enum_type: type[Enum]) -> str:
    return f"{name}=[not_a_choice]" if name == "checkpoint.exit_signals" else f"{name}=not_a_choice"


@pytest.mark.parametrize(("name", "enum_type"), ENUM_FIELDS, ids=[n for n, _ in ENUM_FIELDS])
def test_bad_enum_value_exits_2_with_one_line_listing_allowed_values(name, enum_type, monkeypatch, capsys, tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_config([_bad_override(name, enum_type)])
    monkeypatch.setattr(sys, "argv", ["trainrun", _bad_override(name, enum_type), f"hydra.run.dir={tmp_path}"])
    monkeypatch.setattr(cli, "_task_started", False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert name.split(".")[-1] in err and "not_a_choice" in err
    assert all(member.name in err for member in enum_type)


def test_enum_spelling_is_the_yaml_spelling():
    cfg = compose_config(["parallel.pp_schedule=Interleaved1F1B", "model.norm=layernorm"])
    assert cfg.parallel.pp_schedule is choices.PipelineSchedule["Interleaved1F1B"]
    assert cfg.model.norm is choices.Norm.layernorm and cfg.model.norm == "layernorm"
    assert f"{cfg.model.norm}" == "layernorm"
    with pytest.raises(ConfigError, match=r"model.norm='batchnorm': use one of rmsnorm, layernorm"):
        schema.ModelConfig(norm="batchnorm")  # configs built in Python get the same check


def test_each_set_of_allowed_values_is_written_once():
    """No literal tuple/list/set/dict outside config/choices.py holds two spellings of one Enum."""
    sets = [{m.value for m in e} for e in vars(choices).values()
            if isinstance(e, type) and issubclass(e, choices.Choice) and e is not choices.Choice]
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "choices.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                words = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if any(len(words & allowed) >= 2 for allowed in sets):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {sorted(words)}")
    assert not offenders, offenders


# --- validation rules ----------------------------------------------------------------------------


def _bad(**groups) -> TrainRunConfig:
    cfg = compose_config()
    return replace(cfg, **{g: replace(getattr(cfg, g), **kw) for g, kw in groups.items()})


@pytest.mark.parametrize(("changes", "field"), [
    ({"model": {"n_heads": 5}}, "model.n_heads"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"data": {"seq_len": 1024}}, "data.seq_len"),
    ({"train": {"global_batch_size": 20}}, "train.global_batch_size"),
    ({"train": {"step_executor": "warp"}}, "train.step_executor"),
    ({"model": {"name": "mamba"}}, "model.name"),
    ({"optim": {"schedule": "cyclic"}}, "optim.schedule"),
    ({"data": {"name": "indexed", "path": "/does/not/exist"}}, "data.path"),
    ({"parallel": {"tp": 2}}, "parallel"),
    ({"checkpoint": {"policies": ["best"]}}, "checkpoint.policies"),
    ({"logging": {"sinks": ["wandb"]}}, "logging.sinks"),
    ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps"),
    ({"debug": {"inject_nan_at_steps": [10_000]}}, "debug.inject_nan_at_steps"),
    ({"run": {"plugins": ["not a module"]}}, "run.plugins"),
])
def test_validation_names_field(changes, field):
    with pytest.raises(ConfigError) as info:
        validate_config(_bad(**changes), world_size=1)
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(("changes", "world", "field"), [
    ({"parallel": {"tp": 2}, "model": {"n_heads": 3, "d_model": 96}}, 2, "parallel.tp"),
    ({"parallel": {"tp": 2}, "model": {"position": "learned"}}, 2, "model.position"),
    ({"parallel": {"pp": 2}, "model": {"n_layers": 3, "tie_embeddings": False}}, 2, "parallel.pp"),
    ({"parallel": {"pp": 2}}, 2, "model.tie_embeddings"),
    ({"parallel": {"pp": 2, "pp_schedule": "Interleaved1F1B"}, "model": {"tie_embeddings": False}}, 2,
     "parallel.pp_stages_per_rank"),
    ({"parallel": {"dp_shard": 2}, "train": {"global_batch_size": 40}}, 2, "train.global_batch_size"),
])
def test_cross_group_rules(changes, world, field):
    with pytest.raises(ConfigError) as info:
        validate_config(_bad(**changes), world_size=world)
    assert info.value.field == field


def test_unknown_component_lists_registered_names():
    with pytest.raises(ConfigError, match="registered: .*eager"):
        validate_config(_bad(train={"step_executor": "warp"}), world_size=1)


def test_conf_dir_is_the_checkout():
    assert (Path(CONF) / "config.yaml").is_file()


def test_every_config_field_has_a_docstring():
    from trainrun.config.reference import field_docs, sections

    assert {"logging.wandb", "train.compile", "train.cuda_graph"} <= {name for name, _ in sections()}
    for _, cls in sections():
        missing = {f.name for f in fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_config_reference_is_current():
    from trainrun.config.reference import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == render() + "\n", "regenerate: python -m trainrun.config.reference > docs/config.md"


# --- the config package is the bottom layer --------------------------------------------------------

BESIDE_CONFIG = {"config", "errors", "exit_codes", "registry"}
"""What the config layer may import: itself and the modules beside it (the error kinds, the registry)."""
ABOVE_CONFIG = sorted({p.stem for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
                      - BESIDE_CONFIG - {"__init__"})
"""Every other trainrun package and module (components, export/hf, launch, the orchestrator, the entry point),
listed from the source tree so that a new one is guarded too."""


def test_every_trainrun_package_is_guarded():
    assert {"model", "data", "train", "checkpoint", "launch", "orchestrator", "preflight"} <= set(ABOVE_CONFIG)
    assert {"export", "hf"} & set(ABOVE_CONFIG), ABOVE_CONFIG


@pytest.mark.slow  # a fresh interpreter; the source check below is the fast path's guard
def test_config_imports_no_component_package_at_runtime():
    # The package's own __init__ (which registers the sweep point resolver) is not the config layer's doing.
    code = ("import sys, trainrun; before = set(sys.modules); "
            "import trainrun.config, trainrun.config.validate, trainrun.config.reference; "
            "print(' '.join(sorted(m for m in set(sys.modules) - before if m.startswith('trainrun.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded and not [m for m in loaded if m.split(".")[1] in ABOVE_CONFIG], loaded


def test_config_source_names_no_component_package():
    """Also the imports inside functions, which a runtime check of ``import trainrun.config`` misses."""
    for path in (SRC / "config").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                assert not (parts[0] == "trainrun" and len(parts) > 1 and parts[1] in ABOVE_CONFIG), \
                    f"{path.name}:{node.lineno} imports {name}"


@pytest.mark.parametrize("setting", [{"pp_microbatches": 4}, {"pp_stages_per_rank": 2},
                                     {"pp_schedule": "GPipe"}])
def test_pipeline_settings_without_a_pipeline_are_refused(setting):
    """Options with one meaning: a schedule setting nothing reads (parallel.pp=1) is refused, not ignored."""
    with pytest.raises(ConfigError, match=r"read only with pipeline parallelism"):
        validate_config(_bad(parallel=setting), world_size=1)
