"""Registry lookups, error messages and third-party plugins (installed for real)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, cli_env, read_metrics, run_cli
from trainrun import registry
from trainrun.registry import Registry, UnknownComponentError


def test_register_and_get():
    reg: Registry = Registry("widget", "x.widget")
    reg.register("a", lambda: 1)

    @reg.register("b")
    def build_b():
        return 2

    assert reg.get("b")() == 2 and reg.names() == ["a", "b"]
    with pytest.raises(UnknownComponentError, match=r"x.widget='c'; registered: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", lambda: 3)


def test_builtin_components_registered():
    assert {"single", "torchrun", "slurm", "auto"} <= set(registry.INITIALIZERS.names())
    assert {"eager", "compile", "cuda_graph"} <= set(registry.STEP_EXECUTORS.names())
    assert {"cosine", "linear", "constant", "wsd"} <= set(registry.LR_SCHEDULES.names())
    assert {"stdlib", "indexed"} <= set(registry.DATASETS.names())
    assert {"console", "jsonl", "wandb", "tensorboard"} <= set(registry.METRIC_SINKS.names())
    for reg in (registry.MODELS, registry.OPTIMIZERS, registry.EVALUATORS, registry.CHECKPOINT_POLICIES):
        assert reg.names(), reg.kind


PLUGIN_SRC = '''
"""A third-party trainrun plugin: a metric sink and an LR schedule."""
import json
from trainrun.registry import LR_SCHEDULES, METRIC_SINKS


class CountingSink:
    def __init__(self, path):
        self.path, self.rows = path, 0
    def log(self, metrics, step):
        self.rows += 1
    def log_config(self, config):
        pass
    def close(self):
        self.path.write_text(json.dumps({"rows": self.rows}))


@METRIC_SINKS.register("counting")
def build_counting(cfg, run_dir):
    return CountingSink(run_dir / "counting_sink.json")


@LR_SCHEDULES.register("half")
def build_half(cfg, max_steps):
    return lambda step: 0.5
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """Build and pip-install a real plugin package (with a trainrun.plugins entry point) into a target dir."""
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "trainrun_demo_plugin").mkdir()
    (src / "trainrun_demo_plugin" / "__init__.py").write_text(PLUGIN_SRC)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "trainrun-demo-plugin"
        version = "0.0.1"
        [project.entry-points."trainrun.plugins"]
        demo = "trainrun_demo_plugin"
        [tool.setuptools]
        packages = ["trainrun_demo_plugin"]
    '''))
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True)
    return site


@pytest.mark.e2e
@pytest.mark.slow
def test_plugin_entry_point_adds_components(plugin_site, tmp_path, corpus_cache):
    env = cli_env()
    env["PYTHONPATH"] = f"{plugin_site}:{env['PYTHONPATH']}"
    args = [*TINY, f"data.path={corpus_cache}", "train.max_steps=4", "train.log_interval=2",
            "logging.sinks=[counting]", "optim.schedule=half", "optim.lr=1e-3", "checkpoint.interval=0",
            "eval.sample_tokens=0", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "counting_sink.json").read_text() == '{"rows": 3}'  # 2 train rows + final eval
    lrs = [row["lr"] for row in read_metrics(tmp_path) if "lr" in row]
    assert lrs and all(lr == pytest.approx(0.5 * 1e-3) for lr in lrs)


@pytest.mark.e2e
@pytest.mark.slow
def test_plugin_without_it_is_an_unknown_name(tmp_path):
    proc = run_cli(["optim.schedule=half", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "optim.schedule='half'" in proc.stderr and "cosine" in proc.stderr
