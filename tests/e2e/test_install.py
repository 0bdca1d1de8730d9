"""trainrun installed from a wheel, run from a directory that is not the checkout.

One wheel and one fresh venv serve the whole module. The venv sees the dev environment's
dependencies through a ``.pth`` file (torch is not reinstalled), but not its editable trainrun:
lines of a ``.pth`` file are added to sys.path without processing the ``.pth`` files they hold.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass(frozen=True)
class Installed:
    """A fresh venv with trainrun installed from the wheel."""

    root: Path
    python: Path
    wheel: Path
    env: dict[str, str]

    def run(self, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``args`` (a command of this venv: python, trainrun) in ``cwd``, capturing text output."""
        return subprocess.run(args, cwd=cwd, env=self.env, check=False, capture_output=True, text=True, timeout=timeout)

    def trainrun(self, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python -m trainrun <args>`` with this venv's python."""
        return self.run([str(self.python), "-m", "trainrun", *args], cwd=cwd, timeout=timeout)


def _copy_project(dest: Path) -> Path:
    """The files a wheel is built from, copied so the build leaves nothing in the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for path in REPO.glob("*"):
        if path.is_file() and (path.name in {"pyproject.toml", "README.md"} or path.name.startswith("LICEN")):
            shutil.copy2(path, dest / path.name)
    # a machine-local settings file, as a user has it: it must stay out of the wheel
    (dest / "conf" / "local").mkdir(exist_ok=True)
    (dest / "conf" / "local" / "default.yaml").write_text("# machine-local\n")
    return dest


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """Build the wheel, create a venv, install the wheel (no deps) into it."""
    root = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    # caches and outputs under tmp, not the user's (conf/paths reads TRAINRUN_*, the corpus XDG_CACHE_HOME)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2",
                "XDG_CACHE_HOME": str(root / "cache"), "TRAINRUN_CACHE_DIR": str(root / "cache" / "trainrun"),
                "TRAINRUN_OUTPUT_DIR": str(root / "outputs"), "TRAINRUN_DATA_DIR": str(root / "data")})
    project = _copy_project(root / "project")
    build = [sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "-q", "-w", str(root / "wheel")]
    built = subprocess.run([*build, "--no-build-isolation", "--no-index"], env=env, check=False, capture_output=True,
                           text=True, timeout=300)
    if built.returncode != 0:
        # this environment's setuptools is too old for pyproject.toml (a fresh venv has 65.x): let pip fetch one
        built = subprocess.run(build, env=env, check=False, capture_output=True, text=True, timeout=600)
    _check(built)
    (wheel,) = (root / "wheel").glob("trainrun-*.whl")

    venv = root / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                          check=False, capture_output=True, text=True, timeout=120))
    python = venv / "bin" / "python"
    purelib = _check(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    env=env, check=False, capture_output=True, text=True)).stdout.strip()
    dev_paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(purelib) / "trainrun_test_dev_deps.pth").write_text("".join(f"{p}\n" for p in dev_paths))
    # pip comes from the dev environment through the .pth; --ignore-installed because that environment's
    # (editable) trainrun is visible to it as installed, and must neither satisfy nor be uninstalled
    _check(subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                           "--disable-pip-version-check", "-q", str(wheel)],
                          env=env, check=False, capture_output=True, text=True, timeout=300))
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return Installed(root=root, python=python, wheel=wheel, env=env)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory unrelated to the checkout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_packages_listed_in_pyproject_cover_src():
    """pyproject.toml lists packages explicitly (conf/ is mapped in); a new package must be added there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = {".".join(py.parent.relative_to(REPO / "src").parts) for py in (REPO / "src").rglob("*.py")}
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert setuptools_cfg["package-dir"]["trainrun.conf"] == "conf"


def test_wheel_ships_every_config_and_no_local_settings(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f"trainrun/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")
                if p.relative_to(REPO / "conf").as_posix() != "local/default.yaml"}
    assert {"trainrun/conf/config.yaml", "trainrun/conf/hydra/help/trainrun.yaml"} <= expected
    assert expected <= names
    assert "trainrun/conf/local/default.yaml" not in names


def test_installed_package_is_the_wheel_not_the_checkout(installed, elsewhere):
    code = "import trainrun; from trainrun.config.convert import config_dir; print(trainrun.__file__, config_dir())"
    proc = _check(installed.run([str(installed.python), "-c", code], cwd=elsewhere))
    module, conf = map(Path, proc.stdout.split())
    assert module.is_relative_to(installed.root / "venv"), module
    assert conf.is_relative_to(installed.root / "venv") and (conf / "config.yaml").is_file(), conf


def test_trains_from_another_directory(installed, elsewhere):
    run = installed.root / "run_train"
    _check(installed.trainrun(["train.max_steps=3", "train.log_interval=1", "eval.iters=1", "eval.sample_tokens=0",
                               "data.max_documents=200", f"hydra.run.dir={run}"], cwd=elsewhere))
    assert (run / "metrics.jsonl").is_file()
    assert not (elsewhere / "outputs").exists()


def test_dry_run_of_a_packaged_experiment(installed, elsewhere):
    proc = _check(installed.trainrun(["+experiment=gpt_1b", "run.dry_run=true",
                                      f"hydra.run.dir={installed.root / 'run_dry'}"], cwd=elsewhere))
    assert re.search(r"parameters\s+1,3\d\d,\d{3},\d{3}", proc.stdout + proc.stderr)


def test_info(installed, elsewhere):
    proc = _check(installed.trainrun(["--info"], cwd=elsewhere))
    assert "trainrun/conf" in proc.stdout  # the packaged config dir is on the search path


def test_console_script_help(installed, elsewhere):
    proc = _check(installed.run([str(installed.root / "venv" / "bin" / "trainrun"), "--help"], cwd=elsewhere))
    assert "trainrun" in proc.stdout
    assert "powered by Hydra" not in proc.stdout
    assert "base_" not in proc.stdout
    assert "model: gpt_125m, gpt_1b" in proc.stdout


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A user's config dir with one experiment, outside the package."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "my_exp.yaml").write_text(
        "# @package _global_\n"
        "model: {n_layers: 2, d_model: 64, n_heads: 2}\n"
        "train: {max_steps: 2}\n")
    return conf


def test_user_experiment_with_config_dir(installed, elsewhere, user_conf):
    run = installed.root / "run_user"
    _check(installed.trainrun(["--config-dir", str(user_conf), "experiment=my_exp", "eval.iters=1",
                               "eval.sample_tokens=0", "data.max_documents=200", f"hydra.run.dir={run}"],
                              cwd=elsewhere))
    composed = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert composed["model"]["n_layers"] == 2 and composed["train"]["max_steps"] == 2
    assert (run / "metrics.jsonl").is_file()


def test_user_experiment_with_searchpath(installed, elsewhere, user_conf):
    proc = _check(installed.trainrun([f"hydra.searchpath=[file://{user_conf}]", "experiment=my_exp",
                                      "--cfg", "job"], cwd=elsewhere))
    composed = yaml.safe_load(proc.stdout)
    assert composed["model"]["n_layers"] == 2 and composed["model"]["d_model"] == 64


# --- the core install: no extras ------------------------------------------------------------------

EXTRA_MODULES = ("wandb", "tensorboard", "matplotlib", "optuna", "transformers", "safetensors", "submitit",
                 "hydra_plugins.hydra_submitit_launcher")
"""What the extras bring; none of it may be needed by the main job."""


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> Installed:
    """A venv with the README's first install command only (``pip install torch==2.13.0 -e .``): no extras, and
    nothing of the dev environment. pip resolves the core dependencies as a user's would (a few minutes)."""
    root = tmp_path_factory.mktemp("core")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update({"OMP_NUM_THREADS": "2", "XDG_CACHE_HOME": str(root / "cache"),
                "TRAINRUN_CACHE_DIR": str(root / "cache" / "trainrun"), "TRAINRUN_OUTPUT_DIR": str(root / "outputs"),
                "TRAINRUN_DATA_DIR": str(root / "data")})
    project = _copy_project(root / "project")
    (project / "conf" / "local" / "default.yaml").unlink()  # an editable install reads conf/ in place
    venv = root / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], check=False, capture_output=True, text=True,
                          timeout=300))
    python = venv / "bin" / "python"
    _check(subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "-e", str(project)], env=env,
                          check=False, capture_output=True, text=True, timeout=1500))
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return Installed(root=root, python=python, wheel=project, env=env)


def test_core_install_has_no_extra(core, elsewhere):
    code = f"import importlib.util as u; print([m for m in {EXTRA_MODULES!r} if u.find_spec(m)])"
    assert _check(core.run([str(core.python), "-c", code], cwd=elsewhere)).stdout.strip() == "[]"


def test_core_install_runs_the_main_job(core, elsewhere):
    run = core.root / "run_fast"
    proc = _check(core.trainrun(["debug=fast", "data.max_documents=200", f"hydra.run.dir={run}"], cwd=elsewhere))
    assert (run / "metrics.jsonl").is_file() and "run directory:" in proc.stdout


@pytest.mark.parametrize(("args", "feature", "extra"), [
    (["logging=[default,wandb]"], "logging.wandb.enabled=true", "wandb"),
    (["logging=[default,tensorboard]"], "logging.tensorboard=true", "tensorboard"),
    (["hparams_search=optuna_lr"], "hparams_search=optuna_lr", "optuna"),
    (["hydra/launcher=submitit_local", "optim.lr=1e-3,2e-3"], "hydra/launcher=submitit_local", "slurm"),
], ids=["wandb", "tensorboard", "optuna", "submitit"])
def test_core_install_refuses_a_feature_without_its_extra(core, elsewhere, args, feature, extra):
    """Exit 2 and one line naming the feature and the pip install, before anything is trained or launched."""
    sweep = ["-m"] if extra in ("optuna", "slurm") else []
    proc = core.trainrun([*sweep, "debug=fast", f"hydra.run.dir={core.root / 'refused'}",
                          f"hydra.sweep.dir={core.root / 'refused_sweep'}", *args], cwd=elsewhere)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert feature in proc.stderr and f"pip install 'trainrun[{extra}]'" in proc.stderr, proc.stderr
    assert not (core.root / "refused" / "metrics.jsonl").exists()
    assert not list((core.root / "refused_sweep").glob("*/metrics.jsonl"))


def test_core_install_report_without_matplotlib(core, elsewhere):
    run = core.root / "run_report"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 1, "val_loss": 5.1}\n')
    proc = core.run([str(core.root / "venv" / "bin" / "trainrun-report"), str(run)], cwd=elsewhere)
    assert proc.returncode == 2 and "pip install 'trainrun[report]'" in proc.stderr, proc.stderr
    proc = _check(core.run([str(core.root / "venv" / "bin" / "trainrun-report"), str(run), "--no-png",
                            "--output", str(core.root / "report")], cwd=elsewhere))
    assert (core.root / "report" / "report.csv").is_file() and not (core.root / "report" / "report.png").exists()


def test_core_install_export_without_safetensors(core, elsewhere):
    """trainrun-export refuses before reading any checkpoint (the path need not even exist)."""
    proc = core.run([str(core.root / "venv" / "bin" / "trainrun-export"), str(core.root / "no_run"),
                     "--output", str(core.root / "exported")], cwd=elsewhere)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "trainrun-export needs safetensors" in proc.stderr and "pip install 'trainrun[hf]'" in proc.stderr
    assert not (core.root / "exported").exists()
