"""``--help`` and shell completion of the dev environment's trainrun, as a user's shell runs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import cli_env, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONSOLE_SCRIPT = Path(sys.executable).with_name("trainrun")
"""The ``trainrun`` console script next to this interpreter (``pip install -e .`` puts it there)."""


def test_help_speaks_for_trainrun(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("trainrun"), out[:200]
    assert "powered by Hydra" not in out
    assert "base_" not in out, "the ConfigStore schemas are not options a user picks"
    assert "model: gpt_125m, gpt_1b, gpt_350m, gpt_tiny" in out
    assert "experiment: " in out and "hydra/launcher: " in out
    assert "--config-dir" in out  # $FLAGS_HELP
    assert "python -m trainrun -m optim.lr=1e-4,3e-4" in out  # the footer's examples
    assert "max_steps:" in out  # $CONFIG


def test_help_lists_the_users_config_dir(tmp_path):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "my_exp.yaml").write_text("# @package _global_\ntrain: {max_steps: 2}\n")
    proc = run_cli(["--config-dir", str(tmp_path / "my_conf"), "--help"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "experiment: gpt_125m, gpt_1b, gpt_350m, gpt_tiny, my_exp\n" in proc.stdout


def test_help_resolver_outside_hydra():
    """A saved .hydra/hydra.yaml resolved in a notebook has no config repository to list."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainrun.cli_help import register_help_resolver

    GlobalHydra.instance().clear()
    register_help_resolver()
    register_help_resolver()  # idempotent
    cfg = OmegaConf.create({"template": "${trainrun_config_groups:}"})
    assert "trainrun --help" in cfg.template


def _complete(line: str, tmp_path: Path) -> list[str]:
    """What ``trainrun -sc query=bash`` answers for the command line ``line`` (cursor at its end),
    the call Hydra's bash completion function makes."""
    assert CONSOLE_SCRIPT.is_file(), f"no console script at {CONSOLE_SCRIPT}; run pip install -e ."
    env = cli_env(COMP_LINE=line, COMP_POINT=str(len(line)))
    proc = subprocess.run([str(CONSOLE_SCRIPT), "-sc", "query=bash"], cwd=tmp_path, env=env,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_completion_of_groups_and_keys(tmp_path):
    assert set(_complete("trainrun mod", tmp_path)) == {"model=", "model."}
    assert {"model=gpt_tiny", "model=gpt_1b"} <= set(_complete("trainrun model=", tmp_path))
    assert set(_complete("trainrun model.n_", tmp_path)) == {"model.n_layers=", "model.n_heads=", "model.n_kv_heads="}


def test_completion_hides_schemas(tmp_path):
    """The schemas sit at the root of the ConfigStore (not in their groups), so completion never offers them."""
    assert not [c for c in _complete("trainrun model=", tmp_path) if c.startswith("model=base_")]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_script_end_to_end(tmp_path):
    """Install Hydra's completion function in bash and call it as bash does on <TAB>."""
    script = f"""
    eval "$({CONSOLE_SCRIPT} -sc install=bash)"
    complete -p trainrun
    COMP_LINE='trainrun model.n_'; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=(trainrun model.n_); COMP_CWORD=1
    hydra_bash_completion
    printf 'reply:%s\\n' "${{COMPREPLY[@]}}"
    """
    env = cli_env(PATH=f"{CONSOLE_SCRIPT.parent}:{cli_env().get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hydra_bash_completion trainrun" in proc.stdout  # registered for the console script's name
    replies = {line.removeprefix("reply:") for line in proc.stdout.splitlines() if line.startswith("reply:")}
    assert replies == {"model.n_layers=", "model.n_heads=", "model.n_kv_heads="}
