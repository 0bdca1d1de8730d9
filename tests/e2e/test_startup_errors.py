"""The CLI as a new user meets a broken environment: one line on stderr, exit code 2, no traceback,
before the model is built.

Tests run as root in CI, where permission bits stop nothing; an unwritable directory is made by
putting it below a regular file. wandb is never given a reachable server.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.helpers.cli import TINY, cli_env, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NO_WANDB_CREDENTIALS = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_BASE_URL")


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: no directory can be created below it."""
    path = tmp_path / "file.txt"
    path.write_text("not a directory\n")
    return path


def _env_without_wandb_credentials(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(exist_ok=True)
    env = cli_env(HOME=str(home), **extra)
    for name in NO_WANDB_CREDENTIALS:
        if name not in extra:
            env.pop(name, None)
    return env


def _assert_one_line_exit_2(proc, *parts: str) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["checkpoint.dir={bad}"], "checkpoint.dir is not writable"),
    (["checkpoint.non_persistent_interval=1", "checkpoint.non_persistent_dir={bad}"],
     "checkpoint.non_persistent_dir is not writable"),
    (["data.path={bad}"], "data.path (the stdlib corpus cache) is not writable"),
])
def test_unwritable_directory_is_one_line_before_the_model(overrides, expected, tmp_path, blocker):
    bad = blocker / "sub"
    run_dir = tmp_path / "run"
    args = [*TINY, "train.max_steps=1", f"hydra.run.dir={run_dir}", *(o.format(bad=bad) for o in overrides)]
    proc = run_cli(args, cwd=tmp_path, timeout=120)
    line = _assert_one_line_exit_2(proc, "trainrun: environment error: ", expected, str(bad))
    assert "Not a directory" in line
    assert not (run_dir / "train.log").exists(), "the run must stop before logging, data and model"


def test_unwritable_hydra_run_dir_is_one_line(tmp_path, blocker):
    proc = run_cli([*TINY, "train.max_steps=1", f"hydra.run.dir={blocker / 'run'}"], cwd=tmp_path, timeout=120)
    _assert_one_line_exit_2(proc, "trainrun: environment error: hydra.run.dir is not writable", str(blocker / "run"))


def test_missing_indexed_data_dir_is_one_line_before_the_model(tmp_path):
    run_dir, nowhere = tmp_path / "run", tmp_path / "nowhere"
    proc = run_cli([*TINY, "data=indexed", f"data.path={nowhere}", "train.max_steps=1", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, timeout=120)
    _assert_one_line_exit_2(proc, "trainrun: configuration error: data.path=", str(nowhere), "trainrun-prepare")
    assert not (run_dir / "train.log").exists()


def test_online_wandb_without_credentials_is_refused_up_front(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, f"data.path={corpus_cache}", "train.max_steps=1", f"hydra.run.dir={run_dir}",
                    "logging.wandb.enabled=true", "logging.wandb.mode=online"],
                   cwd=tmp_path, timeout=120, env=_env_without_wandb_credentials(tmp_path / "home"))
    _assert_one_line_exit_2(proc, "trainrun: environment error: ", "no wandb API key", "WANDB_API_KEY",
                            "`wandb login`", "logging.wandb.mode=offline")
    assert not (run_dir / "train.log").exists()
    assert not (run_dir / "wandb").exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_online_wandb_without_a_reachable_server_is_one_line(tmp_path, corpus_cache):
    env = _env_without_wandb_credentials(
        tmp_path / "home", WANDB_API_KEY="0123456789abcdef" * 3, WANDB_BASE_URL=f"http://127.0.0.1:{_closed_port()}",
        WANDB_INIT_TIMEOUT="2")
    proc = run_cli([*TINY, f"data.path={corpus_cache}", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
                    "logging.wandb.enabled=true", "logging.wandb.mode=online"], cwd=tmp_path, timeout=120, env=env)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, proc.stderr
    # The server is only tried when the run opens its wandb run, after the start-up log lines.
    ours = [line for line in proc.stderr.splitlines() if line.startswith("trainrun:")]
    assert len(ours) == 1 and ours[0] == proc.stderr.strip().splitlines()[-1], proc.stderr
    assert "environment error: wandb.init failed (logging.wandb.mode=online)" in ours[0]
    assert "logging.wandb.mode=offline" in ours[0]


def test_every_rank_refuses_alike_without_waiting_for_a_peer(tmp_path, blocker, corpus_cache):
    from tests.distributed.test_parallel import spawn_ranks

    bad = blocker / "ckpt"
    start = time.perf_counter()
    ranks = spawn_ranks(2, tmp_path / "run", [*TINY, f"data.path={corpus_cache}", "train.max_steps=1",
                                              "parallel.dp_replicate=2", f"checkpoint.dir={bad}"], timeout=90)
    for code, err in ranks:  # each rank checks for itself before the rendezvous, so none is left waiting
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert len(err.strip().splitlines()) == 1, err
        assert "environment error: checkpoint.dir is not writable" in err and str(bad) in err
    assert time.perf_counter() - start < 60


# --- configuration errors: one line whatever the environment says ----------------------------------

ENVIRONMENTS = {"HYDRA_FULL_ERROR=0": {"HYDRA_FULL_ERROR": "0"},
                "HYDRA_FULL_ERROR=1,OC_CAUSE=1": {"HYDRA_FULL_ERROR": "1", "OC_CAUSE": "1"}}


def _env(setting: str) -> dict[str, str]:
    env = cli_env(**ENVIRONMENTS[setting])
    if setting == "HYDRA_FULL_ERROR=0":
        env.pop("OC_CAUSE", None)
    return env


@pytest.mark.parametrize("setting", sorted(ENVIRONMENTS))
@pytest.mark.parametrize(("args", "parts"), [
    (["model.norm=batchnorm"], ["model.norm: Invalid value 'batchnorm'", "rmsnorm, layernorm"]),
    (["model.n_layer=3"], ["model.n_layer='3': no such setting; did you mean model.n_layers?"]),
    (["+model.n_layer=3"], ["model.n_layer='3': no such setting; did you mean model.n_layers?"]),
    (["modle=gpt_125m"], ["modle='gpt_125m': no such setting or config group; did you mean model?"]),
    (["+experiment=gpt_12m"], ["experiment=gpt_12m: no such option; did you mean experiment=gpt_125m?",
                               "available: gpt_125m"]),
    (["local=exmaple"], ["local='exmaple': no such option; did you mean local=example?"]),
    (["hydra.run.dir={tmp}/ü"], ["hydra.run.dir='{tmp}/ü': ", """quote it: 'hydra.run.dir="{tmp}/ü"'"""]),
    (["hydra.run.dir={tmp}/my", "run"], ["an unquoted space", "quote it: 'hydra.run.dir={tmp}/my run'"]),
    (["hydra.run.dir={tmp}/a(b)"], ["( ) unquoted", """quote it: 'hydra.run.dir="{tmp}/a(b)"'"""]),
    (["model.n_layers=2", "-m", "optim.lr=1e-3,1e-2"], ["put every override after the flags"]),
    (["model.n_layers=1,2"], ["model.n_layers=1,2: a sweep needs -m (--multirun)"]),
])
def test_config_error_is_one_line_before_anything_is_written(args, parts, setting, tmp_path):
    """Refused before Hydra creates a directory, with the closest valid name or the quoting that reads, and
    never Hydra's own hint (``+model.n_layer=3``) or its lexer report."""
    proc = run_cli([a.format(tmp=tmp_path) for a in args], cwd=tmp_path, timeout=120, env=_env(setting))
    line = _assert_one_line_exit_2(proc, "trainrun: configuration error: ", *(p.format(tmp=tmp_path) for p in parts))
    assert "+model.n_layer" not in line and "Exception" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written"


@pytest.mark.parametrize("setting", sorted(ENVIRONMENTS))
def test_unresolvable_interpolation_is_one_line(setting, tmp_path):
    proc = run_cli(["optim.lr=${optim.lrr}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120,
                   env=_env(setting))
    _assert_one_line_exit_2(proc, "trainrun: configuration error: optim.lr='${optim.lrr}': ",
                            "did you mean ${optim.lr}?")
    assert not (tmp_path / "run" / "train.log").exists()


@pytest.mark.parametrize("multirun", [["-m"], ["--multirun"], ["hydra.mode=MULTIRUN"]])
@pytest.mark.parametrize("below", [False, True], ids=["sweep-dir-is-a-file", "sweep-dir-below-a-file"])
def test_unwritable_sweep_dir_names_hydra_sweep_dir(multirun, below, tmp_path, blocker):
    """Hydra's own creation of the sweep directory (trainrun's pre-flight callback is taken out, so that
    the entry point's handler is what answers) names hydra.sweep.dir however multirun was asked for."""
    sweep_dir = blocker / "sweep" if below else blocker
    args = [*multirun, f"hydra.sweep.dir={sweep_dir}", "~hydra.callbacks.trainrun_sweep", "run.dry_run=true"]
    proc = run_cli(args, cwd=tmp_path, timeout=120)
    line = _assert_one_line_exit_2(proc, "trainrun: environment error: hydra.sweep.dir is not writable",
                                   str(sweep_dir), "set hydra.sweep.dir to")
    assert "hydra.run.dir" not in line


@pytest.mark.parametrize("below", [False, True], ids=["sweep-dir-is-a-file", "sweep-dir-below-a-file"])
def test_sweep_preflight_names_hydra_sweep_dir(below, tmp_path, blocker):
    """The same with trainrun's sweep pre-flight in place, which checks each point's directory under it."""
    sweep_dir = blocker / "sweep" if below else blocker
    proc = run_cli(["-m", f"hydra.sweep.dir={sweep_dir}", "model.n_layers=1,2", "run.dry_run=true"], cwd=tmp_path,
                   timeout=120)
    line = _assert_one_line_exit_2(proc, "trainrun: environment error: hydra.sweep.dir is not writable",
                                   str(sweep_dir), "set hydra.sweep.dir to")
    assert "hydra.run.dir" not in line
