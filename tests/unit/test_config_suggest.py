"""Keys no schema defines, options that do not exist and overrides Hydra cannot read: each refused in one
line naming the field and the fix (the closest valid name, the quoting that reads), whatever the
environment says."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

import trainrun.__main__ as cli
from trainrun.config import ConfigError, compose_config, to_dataclass
from trainrun.config.convert import config_dir
from trainrun.config.store import check_command_line, check_overrides, register_configs
from trainrun.config.suggest import closest_key, missing_option_message, unknown_key_message, unknown_keys
from trainrun.exit_codes import ExitCode


def _hydra_compose(overrides: list[str]) -> DictConfig:
    """Hydra's compose alone, without trainrun's checks of the overrides (as a YAML file would set them)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# --- the closest valid name -----------------------------------------------------------------------


@pytest.mark.parametrize(("typo", "meant"), [
    ("model.n_layer", "model.n_layers"),
    ("modle", "model"),
    ("modle.n_layers", "model.n_layers"),
    ("exprement", "experiment"),
    ("train.lr", "optim.lr"),  # the right name in the wrong section
    ("logging.wandb.mod", "logging.wandb.mode"),
    ("paths.outptu_dir", "paths.output_dir"),
    ("hydra.run.dri", "hydra.run.dir"),
    ("checkpoint.exit_signal[0]", "checkpoint.exit_signals"),
])
def test_closest_key(typo, meant):
    assert closest_key(typo) == meant
    assert unknown_key_message(typo).endswith(f"did you mean {meant}?")


@pytest.mark.parametrize("valid", [
    "model.n_layers", "logging.wandb.mode", "experiment", "local", "debug.profile_steps", "hydra.run.dir",
    "checkpoint.exit_signals[0]",  # a list element
    "hydra.launcher.partition", "hydra.job.env_set.MY_VAR", "hydra.sweeper.params.x",  # Any / dict fields
])
def test_valid_keys_are_not_unknown(valid):
    assert unknown_key_message(valid) is None
    assert closest_key(valid) is None


def test_no_close_name_lists_the_valid_ones():
    message = unknown_key_message("model.zzzz")
    assert message.startswith("no such setting; valid names in model: ") and "n_layers" in message
    assert "or config group" in unknown_key_message("zzzz")


def test_missing_option_message():
    assert missing_option_message("experiment", "gpt_12m", ["gpt_125m", "gpt_1b"]) == \
        "no such option; did you mean experiment=gpt_125m? available: gpt_125m, gpt_1b"
    assert missing_option_message("local", "qqq", ["a"]) == "no such option; available: a"


# --- keys added with + that no schema defines ------------------------------------------------------


@pytest.mark.parametrize(("override", "field_", "meant"), [
    ("+model.n_layer=3", "model.n_layer", "model.n_layers"),
    ("++model.n_layer=3", "model.n_layer", "model.n_layers"),
    ("+modle=gpt_125m", "modle", "model"),
    ("+logging.wandb.mod=online", "logging.wandb.mod", "logging.wandb.mode"),
    ("+train.lr=0.1", "train.lr", "optim.lr"),
])
def test_added_unknown_key_is_refused_with_the_closest_name(override, field_, meant):
    with pytest.raises(ConfigError, match=rf"^{field_}=.*: no such setting.*did you mean {meant}\?$"):
        compose_config([override])
    # Composed by Hydra alone (a key a YAML file adds) it reaches the conversion, which refuses it too.
    cfg = _hydra_compose([override])
    assert unknown_keys(cfg) == [field_]
    with pytest.raises(ConfigError, match=rf"^{field_}=.*did you mean {meant}\?$"):
        to_dataclass(cfg)


def test_every_unknown_key_is_named():
    cfg = _hydra_compose(["+model.extra.x=1", "+optim.zz=2"])
    assert unknown_keys(cfg) == ["model.extra", "optim.zz"]
    with pytest.raises(ConfigError, match=r"model\.extra=\{'x': 1\}: no such setting.*also unknown: optim\.zz"):
        to_dataclass(cfg)


@dataclass
class _Inner:
    size: int = 1


@dataclass
class _WithFreeForm:
    inner: _Inner = field(default_factory=_Inner)
    extra: dict[str, int] = field(default_factory=dict)
    anything: Any = None


def test_free_form_fields_hold_any_key():
    cfg = OmegaConf.structured(_WithFreeForm)
    cfg.extra["whatever"] = 3
    cfg.anything = {"a": {"b": 1}}
    with open_dict(cfg.inner):
        cfg.inner.sise = 2
    assert unknown_keys(cfg, _WithFreeForm) == ["inner.sise"]


def test_interpolation_errors_are_config_errors():
    with pytest.raises(ConfigError, match=r"optim\.lr='\$\{optim\.lrr\}': .*not found; did you mean \$\{optim\.lr\}\?"):
        compose_config(["optim.lr=${optim.lrr}"])
    with pytest.raises(ConfigError, match=r"optim\.lr='\?\?\?': no value given"):
        compose_config(["optim.lr=???"])
    with pytest.raises(ConfigError, match=r"model\.n_layers='\$\{optim\.lr\}': .*could not be converted"):
        compose_config(["model.n_layers=${optim.lr}"])


def test_missing_option_of_an_optional_group_is_refused():
    with pytest.raises(ConfigError, match=r"local='exmaple': no such option; did you mean local=example\?"):
        compose_config(["local=exmaple"])
    compose_config(["local=example"])


# --- overrides Hydra's grammar cannot read ---------------------------------------------------------


@pytest.mark.parametrize(("argv", "field_", "value"), [
    (["hydra.run.dir=/tmp/ü"], "hydra.run.dir", "/tmp/ü"),
    (["hydra.run.dir=/tmp/a(b)"], "hydra.run.dir", "/tmp/a(b)"),
    (["data.path=~/data"], "data.path", "~/data"),
    (["checkpoint.dir=/tmp/it's"], "checkpoint.dir", "/tmp/it's"),
    (['checkpoint.dir=/tmp/say"hi'], "checkpoint.dir", '/tmp/say"hi'),
    (["hydra.run.dir=/tmp/my", "run"], "hydra.run.dir", "/tmp/my run"),  # the shell split it at a space
    (["hydra.run.dir=/tmp/my", "ü"], "hydra.run.dir", "/tmp/my ü"),
])
def test_unreadable_override_names_the_quoting_that_reads(argv, field_, value):
    with pytest.raises(ConfigError) as err:
        check_overrides(argv)
    assert err.value.field == field_ and err.value.value == value
    assert "quote it: " in err.value.fix and "\n" not in str(err.value)
    fixed = shlex.split(err.value.fix.split("quote it: ")[1])
    assert len(fixed) == 1  # one shell word
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(fixed)[0]
    assert parsed.key_or_group == field_ and parsed.value() == value


def test_not_an_override_and_malformed_interpolation():
    with pytest.raises(ConfigError, match="not an override; write key=value"):
        check_overrides(["n_layers"])
    with pytest.raises(ConfigError, match="malformed interpolation"):
        check_overrides(["optim.lr=${optim.lr"])


def test_bad_flags_are_one_line_and_flags_are_not_overrides(capsys):
    with pytest.raises(ConfigError, match=r"^command line='--cfg nope': argument --cfg/-c: invalid choice: 'nope'"):
        check_command_line(["--cfg", "nope"])
    with pytest.raises(ConfigError, match=r"--bogus is no option of python -m trainrun"):
        check_command_line(["--bogus", "model.n_layers=2"])
    check_command_line(["-sc", "query=bash"])  # shell completion's commands are no overrides
    check_command_line(["--version"])
    with pytest.raises(ConfigError, match="local='mine': no such option; available: example"):
        check_command_line(["local=mine"], {"local": ["example"]})
    check_command_line(["--config-dir", "/elsewhere", "local=mine"], {"local": ["example"]})  # it may be there
    assert capsys.readouterr() == ("", "")


def test_overrides_around_a_flag_are_refused_with_the_order_that_works():
    with pytest.raises(ConfigError, match=r"put every override after the flags: python -m trainrun -m a=1 b=2$"):
        check_command_line(["a=1", "-m", "b=2"])
    check_command_line(["-m", "model.n_layers=1,2", "--cfg", "job"])
    check_command_line(["model.n_layers=2", "-m"])
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        check_command_line(["-cn", "config", "model.n_layer=2"])


# --- the CLI's line, whatever the environment --------------------------------------------------------


def test_composition_error_line_suggests_instead_of_hydras_plus_hint():
    """A key error while composing (a YAML file's typo; the command line's are refused earlier) gets our
    suggestion, never Hydra's hint to add the typo with +."""
    with pytest.raises(ConfigCompositionException) as err:
        _hydra_compose(["model.n_layer=3"])
    line = cli.composition_error_line(err.value)
    assert line == "model.n_layer: no such setting; did you mean model.n_layers?"


@pytest.mark.parametrize("env", [{"HYDRA_FULL_ERROR": "0"}, {"HYDRA_FULL_ERROR": "1"}, {"OC_CAUSE": "1"}, {}])
@pytest.mark.parametrize(("override", "expected"), [
    ("model.norm=batchnorm", "model.norm: Invalid value 'batchnorm', expected one of [rmsnorm, layernorm]"),
    ("model.n_layer=3", "model.n_layer='3': no such setting; did you mean model.n_layers?"),
    ("+model.n_layer=3", "model.n_layer='3': no such setting; did you mean model.n_layers?"),
    ("modle=gpt_125m", "modle='gpt_125m': no such setting or config group; did you mean model?"),
    ("experiment=gpt_12m", "experiment=gpt_12m: no such option; did you mean experiment=gpt_125m? available: "),
    ("debug=fsat", "debug=fsat: no such option; did you mean debug=fast? available: "),
    ("model.n_layers=1,2", "model.n_layers=1,2: a sweep needs -m (--multirun)"),
])
def test_main_prints_one_line_and_exits_2_whatever_the_environment(override, expected, env, monkeypatch, capsys,
                                                                     tmp_path):
    for name in ("HYDRA_FULL_ERROR", "OC_CAUSE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["trainrun", override, f"hydra.run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(cli, "_task_started", False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == ExitCode.CONFIG_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"trainrun: configuration error: {expected}"), err
    assert "+model.n_layer" not in err and "HYDRA_FULL_ERROR" not in err


def test_a_removed_setting_names_its_successor():
    from trainrun.config.suggest import unknown_key_message

    assert unknown_key_message("run.output_dir") == "no such setting any more; use hydra.run.dir"
