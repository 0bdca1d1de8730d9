"""Tests for trainrun.preflight: start-up checks of directories and wandb credentials, one line each.

Tests run as root in CI, where permission bits stop nothing; an unwritable directory is made by
putting it below a regular file (creating it fails with "Not a directory" for every user).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainrun import orchestrator, preflight
from trainrun.checkpoint.paths import non_persistent_dir
from trainrun.config.schema import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, TrainRunConfig, WandbConfig
from trainrun.data import corpus
from trainrun.errors import ConfigError, RunEnvironmentError


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: no directory can be created below it."""
    path = tmp_path / "file.txt"
    path.write_text("not a directory\n")
    return path


def _cfg(tmp_path: Path, **checkpoint) -> TrainRunConfig:
    return TrainRunConfig(data=DataConfig(path=str(tmp_path / "cache")), checkpoint=CheckpointConfig(**checkpoint))


def _assert_one_line(err: RunEnvironmentError, *parts: str) -> None:
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --- writable directories ----------------------------------------------------------------------


def test_writable_dir_is_created_and_left_without_probe(tmp_path):
    target = tmp_path / "a" / "b"
    preflight.check_writable_dir(target, "checkpoint.dir")
    assert target.is_dir() and list(target.iterdir()) == []


def test_dir_below_a_file_names_option_and_path(blocker):
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_writable_dir(blocker / "ckpt", "checkpoint.dir")
    _assert_one_line(info.value, "checkpoint.dir is not writable", str(blocker / "ckpt"),
                     "set checkpoint.dir to a directory you can write to")


def test_dir_that_is_a_file_says_so(blocker):
    with pytest.raises(RunEnvironmentError, match="exists and is not a directory"):
        preflight.check_writable_dir(blocker, "hydra.run.dir")


def test_note_names_where_a_default_came_from(blocker):
    with pytest.raises(RunEnvironmentError, match=r"checkpoint.dir \(null: <run dir>/checkpoints\) is not writable"):
        preflight.check_writable_dir(blocker / "checkpoints", "checkpoint.dir", "null: <run dir>/checkpoints")


def test_run_directory_follows_resolve_run_dir(tmp_path, monkeypatch):
    assert preflight.run_directory(tmp_path)[:2] == (tmp_path, "hydra.run.dir")
    monkeypatch.chdir(tmp_path)
    assert preflight.run_directory(None)[0] == tmp_path


def test_checkpoint_directories_match_the_stores(tmp_path):
    run_dir = tmp_path / "run"
    assert [d for d, *_ in preflight.checkpoint_directories(_cfg(tmp_path), run_dir)] == [run_dir / "checkpoints"]
    cfg = _cfg(tmp_path, dir=str(tmp_path / "ck"), non_persistent_interval=5)
    dirs = preflight.checkpoint_directories(cfg, run_dir)
    assert [(d, option) for d, option, _ in dirs] == [
        (tmp_path / "ck", "checkpoint.dir"), (non_persistent_dir(cfg, run_dir), "checkpoint.non_persistent_dir")]


@pytest.mark.parametrize("field", ["dir", "non_persistent_dir"])
def test_check_environment_refuses_unwritable_checkpoint_dirs(tmp_path, blocker, field):
    cfg = _cfg(tmp_path, non_persistent_interval=1, **{field: str(blocker / "ck")})
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_environment(cfg, tmp_path / "run")
    _assert_one_line(info.value, f"checkpoint.{field} is not writable", str(blocker / "ck"))


def test_check_environment_refuses_unwritable_run_dir(tmp_path, blocker):
    with pytest.raises(RunEnvironmentError, match="hydra.run.dir is not writable"):
        preflight.check_environment(_cfg(tmp_path), blocker / "run")


def test_dry_run_checks_no_checkpoint_dir(tmp_path, blocker):
    cfg = _cfg(tmp_path, dir=str(blocker / "ck"))
    cfg.run = RunConfig(dry_run=True)
    preflight.check_environment(cfg, tmp_path / "run")  # a dry run saves nothing
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_orchestrator_refuses_before_building_anything(tmp_path, blocker):
    with pytest.raises(RunEnvironmentError, match="checkpoint.dir"):
        orchestrator.run(_cfg(tmp_path, dir=str(blocker / "ck")), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "train.log").exists(), "logging (and everything after it) must not have started"


# --- data --------------------------------------------------------------------------------------


@pytest.fixture
def tiny_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-file "standard library", so building and keying the corpus takes milliseconds."""
    root = tmp_path / "stdlib"
    root.mkdir()
    for name in ("a.py", "b.py"):
        (root / name).write_text(f"# {name}\nprint('hello from {name}')\n" * 20)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    return root


def test_stdlib_cache_below_a_file_is_refused(tiny_stdlib, blocker):
    cfg = TrainRunConfig(data=DataConfig(path=str(blocker / "cache")))
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_data_cache(cfg)
    _assert_one_line(info.value, "data.path (the stdlib corpus cache) is not writable", str(blocker / "cache"))


def test_cache_dir_from_the_environment_is_named_as_such(tiny_stdlib, blocker, monkeypatch):
    monkeypatch.setenv("TRAINRUN_CACHE_DIR", str(blocker))
    cfg = TrainRunConfig(data=DataConfig(path=str(blocker)))  # as conf/data/stdlib.yaml resolves it
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_data_cache(cfg)
    _assert_one_line(info.value, "TRAINRUN_CACHE_DIR (the stdlib corpus cache", "exists and is not a directory",
                     "set TRAINRUN_CACHE_DIR to a directory")


def test_read_only_cache_is_fine_once_the_corpus_is_built(tmp_path, tiny_stdlib, monkeypatch):
    cache = tmp_path / "shared-cache"
    cfg = TrainRunConfig(data=DataConfig(path=str(cache), val_fraction=0.5))
    corpus.build_stdlib_corpus(cache, cfg.data.val_fraction, cfg.data.max_documents, root=tiny_stdlib)

    def read_only(path, option, note=""):
        raise RunEnvironmentError(f"{option} is not writable (Read-only file system)", str(path), "fix")

    monkeypatch.setattr(preflight, "check_writable_dir", read_only)
    preflight.check_data_cache(cfg)
    other = TrainRunConfig(data=DataConfig(path=str(cache), val_fraction=0.25))  # a corpus not built yet
    with pytest.raises(RunEnvironmentError, match="Read-only"):
        preflight.check_data_cache(other)


def test_indexed_data_is_not_probed_for_writing(blocker):
    preflight.check_data_cache(TrainRunConfig(data=DataConfig(name="indexed", path=str(blocker / "ds"))))


# --- wandb credentials -------------------------------------------------------------------------


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty HOME and no wandb credentials in the environment; wandb's session state reset around the test."""
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    wandb.teardown()
    yield home
    wandb.teardown()


ONLINE = WandbConfig(enabled=True, mode="online")


def test_online_wandb_without_credentials_is_refused(wandb_home):
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_wandb_credentials(ONLINE)
    _assert_one_line(info.value, "no wandb API key", "WANDB_API_KEY", "wandb login", "logging.wandb.mode=offline")


def test_online_wandb_with_a_key_in_the_environment(wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 3)
    preflight.check_wandb_credentials(ONLINE)


def test_online_wandb_with_a_netrc_entry(wandb_home):
    import wandb
    from wandb.sdk import wandb_setup

    host = wandb_setup.singleton().settings.base_url.split("://", 1)[1]
    (wandb_home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'0123456789abcdef' * 3}\n")
    wandb.teardown()
    preflight.check_wandb_credentials(ONLINE)


def test_malformed_key_is_one_line(wandb_home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(RunEnvironmentError) as info:
        preflight.check_wandb_credentials(ONLINE)
    _assert_one_line(info.value, "wandb credentials are invalid", "WANDB_API_KEY")


@pytest.mark.parametrize("cfg", [WandbConfig(enabled=True, mode="offline"), WandbConfig(enabled=False, mode="online")])
def test_offline_or_disabled_wandb_needs_no_credentials(wandb_home, cfg):
    preflight.check_wandb_credentials(cfg)


def test_wandb_init_error_becomes_one_environment_line(tmp_path, monkeypatch):
    import wandb

    from trainrun.observe.wandb_sink import WandbSink

    def unreachable(**_kwargs):
        raise wandb.errors.CommError("Timed out while retrying: connection refused\nConsider increasing init_timeout")

    monkeypatch.setattr(wandb, "init", unreachable)
    with pytest.raises(RunEnvironmentError) as info:
        WandbSink(LoggingConfig(wandb=ONLINE).wandb, tmp_path)
    _assert_one_line(info.value, "wandb.init failed (logging.wandb.mode=online)", "connection refused",
                     "logging.wandb.mode=offline")
    assert "init_timeout" not in str(info.value)


def test_first_line():
    assert preflight.first_line(ValueError("\n  first\nsecond")) == "first"
    assert preflight.first_line(ValueError("")) == "ValueError"


def test_paths_a_config_reads_are_checked_at_start_up_not_while_validating(tmp_path, blocker):
    """Validation touches no file; the start-up checks refuse a resume path that is no directory and a data file."""
    from trainrun.config import validate_config

    missing = TrainRunConfig(checkpoint=CheckpointConfig(resume=str(tmp_path / "no_such_ckpt")))
    validate_config(missing)  # the config layer does not look
    with pytest.raises(ConfigError, match=r"checkpoint\.resume=.*use auto, never, or the path"):
        preflight.check_environment(missing, tmp_path / "run")
    data_file = TrainRunConfig(data=DataConfig(path=str(blocker)))
    validate_config(data_file)
    with pytest.raises(ConfigError, match=r"data\.path=.*is a file"):
        preflight.check_environment(data_file, tmp_path / "run")
