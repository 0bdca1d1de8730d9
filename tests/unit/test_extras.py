"""Optional dependencies (trainrun.extras): a feature chosen without its extra is one line naming the feature
and the ``pip install``, and nothing imports an optional library at module level.

A missing package is simulated the way Python itself reads it: ``sys.modules[name] = None`` makes
``find_spec`` find nothing and ``import name`` fail. tests/e2e/test_install.py runs the same
refusals in a real venv that has only the core install.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainrun import preflight
from trainrun.config.schema import DataConfig, LoggingConfig, ModelConfig, RunConfig, TrainRunConfig, WandbConfig
from trainrun.errors import RunEnvironmentError
from trainrun.extras import MissingExtraError, check_run_extras, check_sweep_extras, installed, require
from trainrun.launch import report

REPO = Path(__file__).resolve().parents[2]

OPTIONAL = {"wandb", "tensorboard", "matplotlib", "optuna", "transformers", "safetensors", "submitit",
            "hydra_plugins.hydra_submitit_launcher"}
"""Top-level modules of the extras (pyproject.toml's optional-dependencies)."""


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _assert_line(err: BaseException, *parts: str) -> None:
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_require_names_the_feature_and_the_pip_line(monkeypatch):
    _missing(monkeypatch, "wandb")
    assert not installed("wandb") and installed("torch")
    with pytest.raises(MissingExtraError) as info:
        require("wandb", "wandb", "logging=wandb")
    assert isinstance(info.value, RunEnvironmentError) and info.value.exit_code == 2
    _assert_line(info.value, "logging=wandb needs wandb", "pip install 'trainrun[wandb]'")
    assert info.value.line().startswith("trainrun: environment error: logging=wandb")


def test_a_module_below_a_missing_package_is_missing():
    assert not installed("no_such_package_xyz.sub")


@pytest.mark.parametrize(("logging", "model", "module", "extra"), [
    (LoggingConfig(wandb=WandbConfig(enabled=True)), ModelConfig(), "wandb", "wandb"),
    (LoggingConfig(tensorboard=True), ModelConfig(), "tensorboard", "tensorboard"),
], ids=["wandb", "tensorboard"])
def test_a_run_refuses_a_sink_whose_extra_is_missing(monkeypatch, tmp_path, logging, model, module, extra):
    _missing(monkeypatch, module)
    cfg = TrainRunConfig(logging=logging, model=model, data=DataConfig(path=str(tmp_path / "cache")))
    with pytest.raises(MissingExtraError) as info:
        preflight.check_environment(cfg, tmp_path / "run")
    _assert_line(info.value, f"pip install 'trainrun[{extra}]'")
    assert not (tmp_path / "cache").exists()  # refused before the data cache or checkpoints are touched


def test_init_from_needs_the_hf_extra(monkeypatch):
    _missing(monkeypatch, "safetensors")
    cfg = TrainRunConfig()
    object.__setattr__(cfg.model, "init_from", "/models/x")  # resolving it (config.json) is not this test's business
    with pytest.raises(MissingExtraError, match=r"model.init_from needs safetensors.*trainrun\[hf\]"):
        check_run_extras(cfg)


def test_a_dry_run_needs_no_extra(monkeypatch, tmp_path):
    _missing(monkeypatch, "wandb", "tensorboard")
    cfg = TrainRunConfig(run=RunConfig(dry_run=True), logging=LoggingConfig(wandb=WandbConfig(enabled=True),
                                                                            tensorboard=True),
                         data=DataConfig(path=str(tmp_path / "cache")))
    preflight.check_environment(cfg, tmp_path / "run")


def _sweep_config(launcher: str, sweeper: str, search: str | None = None):
    targets = {"basic": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
               "trainrun_optuna": "hydra_plugins.trainrun_optuna.sweeper.TrainrunOptunaSweeper",
               "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
               "basic_launcher": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    return OmegaConf.create({"hydra": {
        "runtime": {"choices": {"hydra/launcher": launcher, "hydra/sweeper": sweeper, "hparams_search": search}},
        "launcher": {"_target_": targets.get(launcher, "")} if launcher.startswith("submitit") else {},
        "sweeper": {"_target_": targets[sweeper]}}})


def test_a_sweep_refuses_a_launcher_or_search_whose_extra_is_missing(monkeypatch):
    _missing(monkeypatch, "hydra_plugins.hydra_submitit_launcher", "optuna")
    with pytest.raises(MissingExtraError) as info:
        check_sweep_extras(_sweep_config("submitit_slurm", "basic"))
    _assert_line(info.value, "hydra/launcher=submitit_slurm needs hydra-submitit-launcher",
                 "pip install 'trainrun[slurm]'")
    with pytest.raises(MissingExtraError) as info:
        check_sweep_extras(_sweep_config("basic", "trainrun_optuna", "optuna_lr"))
    _assert_line(info.value, "hparams_search=optuna_lr needs optuna", "pip install 'trainrun[optuna]'")
    check_sweep_extras(_sweep_config("basic", "basic"))  # a plain sweep needs nothing


def test_report_without_matplotlib_is_one_line_or_no_png(monkeypatch, tmp_path, capsys):
    _missing(monkeypatch, "matplotlib")
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'trainrun[report]'" in err and "--no-png" in err, err


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports run when the module is imported: top level, and in top-level if/try blocks (not TYPE_CHECKING)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
    return found


def test_no_optional_library_is_imported_at_module_level():
    """The core install (no extras) can import every module of trainrun and its Hydra plugin."""
    offenders = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for line, module in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if any(module == name or module.startswith(name + ".") for name in OPTIONAL) \
                    or module == "torch.utils.tensorboard":
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert offenders == [], "import it inside the function that needs it, behind trainrun.extras.require"


def test_every_extra_the_code_names_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    source = "".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    named = set(re.findall(r"trainrun\[([a-z]+)\]", source))
    named |= set(re.findall(r'require\("[\w.]+", "(\w+)"', source))
    assert named and named <= set(extras), named - set(extras)
    assert {"wandb", "tensorboard", "report", "optuna", "hf", "slurm", "all", "test"} <= set(extras)
