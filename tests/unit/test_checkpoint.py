"""Checkpoint policies, the atomic store, retention, safe loading, the exit controller and the checkpointer.

Fast: tiny tensors and a two-layer model, no subprocesses (the process-level faults are in tests/faults).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainrun.checkpoint.checkpointer import Checkpointer, changed_settings, config_hash
from trainrun.checkpoint.dcp_io import load_tensors
from trainrun.checkpoint.exit_controller import ExitController
from trainrun.checkpoint.layout import LATEST_FILE, MANIFEST_FILE, META_FILE, read_meta, verify_checkpoint
from trainrun.checkpoint.policy import SaveContext, SaveKind, build_policy
from trainrun.checkpoint.resume import ResumeChooser, check_model_compatible
from trainrun.checkpoint.store import CheckpointError, CheckpointStore
from trainrun.config.schema import (
    CheckpointConfig,
    ModelConfig,
    TrainConfig,
    TrainRunConfig,
)
from trainrun.distributed.env import DistEnv
from trainrun.errors import ConfigError
from trainrun.optim import build_lr_scheduler
from trainrun.optim.tensor_state import lr_as_tensor
from trainrun.state import TrainState

# DCP says it saves/loads in a single process without a process group: that is what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# ---- policies -------------------------------------------------------------------------------


def _ctx(step: int, final: bool = False, improved: bool = False, minutes: float = 0.0) -> SaveContext:
    return SaveContext(TrainState(step=step), final, improved, minutes)


def test_policies_combine():
    cfg = CheckpointConfig(interval=10, time_interval_min=5.0, save_best=True, non_persistent_interval=3)
    policy = build_policy(cfg)
    assert policy.decide(_ctx(1)) is None
    assert policy.decide(_ctx(3)) == SaveKind.NON_PERSISTENT
    assert policy.decide(_ctx(10)) == SaveKind.PERSISTENT
    assert policy.decide(_ctx(30)) == SaveKind.PERSISTENT  # persistent beats non-persistent
    assert policy.decide(_ctx(7, minutes=5.0)) == SaveKind.PERSISTENT  # time
    assert policy.decide(_ctx(7, improved=True)) == SaveKind.PERSISTENT  # best
    assert policy.decide(_ctx(7, final=True)) == SaveKind.PERSISTENT  # final
    assert policy.decide(_ctx(7, minutes=4.9)) is None


def test_policies_can_be_disabled():
    cfg = CheckpointConfig(interval=0, time_interval_min=None, save_best=False, non_persistent_interval=0,
                           save_final=False)
    policy = build_policy(cfg)
    assert all(policy.decide(_ctx(s, final=True, improved=True, minutes=1e9)) is None for s in range(1, 50))
    only_interval = build_policy(CheckpointConfig(interval=4, save_final=False))
    assert only_interval.decide(_ctx(4)) == SaveKind.PERSISTENT
    assert only_interval.decide(_ctx(5, final=True, improved=True, minutes=1e9)) is None


def test_built_in_policies_have_one_switch_each():
    """A built-in policy is switched by its own field; listing it as an extra policy is refused."""
    with pytest.raises(ConfigError, match="switched by checkpoint.interval"):
        build_policy(CheckpointConfig(policies=["interval"]))


# ---- store: commit, verify, fall back, prune ----------------------------------------------------


def _store(directory: Path, keep_last: int = 0, verify: str = "sha256") -> CheckpointStore:
    return CheckpointStore(directory, keep_last, True, lambda: None, verify)


def _tensors(step: int) -> dict:
    return {"model": {"w": torch.full((64, 64), float(step)), "b": torch.arange(8.0) + step}}


def _save(store: CheckpointStore, step: int, protect: set[Path] = frozenset()) -> Path:
    return store.save(step, _tensors(step), {"step": step}, protect=set(protect))


def _data_file(path: Path) -> Path:
    return next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp")


def test_commit_writes_complete_checkpoint_and_latest(tmp_path):
    store = _store(tmp_path)
    path = _save(store, 3)
    assert path == tmp_path / "step_3"
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_3"
    assert not list(tmp_path.glob(".tmp_*"))
    meta = read_meta(path)
    assert meta["step"] == 3
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert all("sha256" in entry and entry["size"] > 0 for entry in manifest.values())
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
    assert set(manifest) == on_disk and {".metadata", META_FILE} <= on_disk  # every file, trainrun.json too
    assert verify_checkpoint(path, "sha256") is None
    loaded = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(8)}}
    load_tensors(path, loaded)
    assert torch.equal(loaded["model"]["w"], _tensors(3)["model"]["w"])


def test_stale_tmp_dir_is_never_read_and_is_cleaned(tmp_path):
    store = _store(tmp_path)
    _save(store, 2)
    (tmp_path / ".tmp_step_4").mkdir()  # a save killed half way
    (tmp_path / ".tmp_step_4" / "__0_0.distcp").write_bytes(b"partial")
    assert store.directory.find_latest() == tmp_path / "step_2"
    _save(store, 6)
    assert not (tmp_path / ".tmp_step_4").exists()


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_dcp_metadata", "no_trainrun_json",
                                    "edited_trainrun_json"])
def test_damaged_newest_falls_back_with_warning(tmp_path, caplog, damage):
    store = _store(tmp_path)
    _save(store, 2)
    newest = _save(store, 4)
    data = _data_file(newest)
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "bitflip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif damage == "no_dcp_metadata":
        (newest / ".metadata").unlink()
    elif damage == "edited_trainrun_json":  # e.g. a hand-edited step or data position: the manifest catches it
        meta = json.loads((newest / META_FILE).read_text())
        (newest / META_FILE).write_text(json.dumps({**meta, "step": 40}))
    else:
        (newest / META_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="trainrun.checkpoint.layout"):
        assert store.directory.find_latest() == tmp_path / "step_2"
    assert f"skipping checkpoint {newest}" in caplog.text
    assert "falling back to" in caplog.text


def test_size_verification_misses_bitflip_but_catches_truncation(tmp_path):
    store = _store(tmp_path, verify="size")
    path = _save(store, 1)
    data = _data_file(path)
    raw = bytearray(data.read_bytes())
    raw[10] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert verify_checkpoint(path, "size") is None
    data.write_bytes(bytes(raw[:-1]))
    assert "truncated" in verify_checkpoint(path, "size")


def test_missing_latest_scans_with_warning(tmp_path, caplog):
    store = _store(tmp_path)
    _save(store, 2)
    _save(store, 5)
    (tmp_path / LATEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="trainrun.checkpoint.layout"):
        assert store.directory.find_latest() == tmp_path / "step_5"
    assert "is missing; scanning" in caplog.text


def test_newer_complete_checkpoint_than_latest_is_used(tmp_path, caplog):
    """A kill between the rename and the update of ``latest`` loses nothing."""
    store = _store(tmp_path)
    _save(store, 2)
    _save(store, 4)
    (tmp_path / LATEST_FILE).write_text("step_2\n")
    with caplog.at_level(logging.WARNING):
        assert store.directory.find_latest() == tmp_path / "step_4"
    assert "newer" in caplog.text


def test_nothing_usable(tmp_path):
    store = _store(tmp_path)
    assert store.directory.find_latest() is None
    path = _save(store, 1)
    (path / ".metadata").unlink()
    assert store.directory.find_latest() is None


def test_keep_last_never_prunes_protected(tmp_path):
    store = _store(tmp_path, keep_last=2)
    best = _save(store, 1)
    resumed = _save(store, 2)
    for step in range(3, 8):
        _save(store, step, protect={best, resumed})
    assert [p.name for p in store.directory.checkpoints()] == ["step_1", "step_2", "step_6", "step_7"]
    _save(store, 8)  # nothing protected any more
    assert [p.name for p in store.directory.checkpoints()] == ["step_7", "step_8"]


def test_keep_last_protection_survives_async_saves(tmp_path):
    store = _store(tmp_path, keep_last=1)
    best = _save(store, 1)
    for step in range(2, 6):
        store.save_async(step, _tensors(step), {"step": step}, protect={best})
    store.close(protect={best})
    assert [p.name for p in store.directory.checkpoints()] == ["step_1", "step_5"]


def test_async_save_commits_on_finalize(tmp_path):
    store = _store(tmp_path)
    tensors = _tensors(7)
    store.save_async(7, tensors, {"step": 7})
    store.wait_for_staging()
    tensors["model"]["w"].add_(100)  # parameters change after staging: the checkpoint keeps the old values
    assert not (tmp_path / "step_7").exists()
    assert store.finalize(blocking=True) == tmp_path / "step_7"
    assert store.pending is None
    loaded = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(8)}}
    load_tensors(tmp_path / "step_7", loaded)
    assert torch.equal(loaded["model"]["w"], torch.full((64, 64), 7.0))
    store.close()


def test_failed_save_leaves_previous_intact(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _save(store, 2)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", no_space)
    with pytest.raises(CheckpointError, match="No space left"):
        _save(store, 4)
    assert not list(tmp_path.glob(".tmp_*"))
    assert store.directory.find_latest() == tmp_path / "step_2"
    assert (tmp_path / LATEST_FILE).read_text().strip() == "step_2"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dcp_checkpoint_exception_is_reported_concisely(tmp_path, monkeypatch, mode):
    """DCP wraps a full disk in CheckpointException, a BaseException: it must not escape as such."""
    from torch.distributed.checkpoint.api import CheckpointException

    store = _store(tmp_path)
    _save(store, 2)
    enospc = OSError(28, "No space left on device")
    def failing_write(*args, **kwargs):
        raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (enospc, None)})

    if mode == "sync":
        monkeypatch.setattr(dcp, "save", failing_write)
        with pytest.raises(CheckpointError,
                           match=r"rank 0: OSError: \[Errno 28\] No space left on device \(.*MiB free on"):
            _save(store, 4)
    else:
        from concurrent.futures import Future

        class _Response:
            staging_completion = Future()
            upload_completion = Future()

        _Response.staging_completion.set_result(None)
        _Response.upload_completion.set_exception(CheckpointException("x", {0: (enospc, None)}))
        monkeypatch.setattr(dcp, "async_save", lambda *a, **k: _Response())
        store.save_async(4, _tensors(4), {"step": 4})
        with pytest.raises(CheckpointError, match="async save of step 4 .* rank 0: OSError"):
            store.finalize(blocking=True)
        store.close()
    assert not list(tmp_path.glob(".tmp_*"))
    assert store.directory.find_latest() == tmp_path / "step_2"


def test_resave_same_step_replaces_it(tmp_path):
    store = _store(tmp_path)
    _save(store, 3)
    store.save(3, _tensors(30), {"step": 3})
    loaded = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(8)}}
    load_tensors(tmp_path / "step_3", loaded)
    assert loaded["model"]["w"][0, 0].item() == 30.0
    assert not list(tmp_path.glob(".old_*"))


# ---- safe loading -------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_metadata_pickle_with_code_is_rejected(tmp_path):
    path = _save(_store(tmp_path / "ckpt"), 1)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    loaded = {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(8)}}
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system"):
        load_tensors(path, loaded)
    assert not marker.exists()


def test_foreign_entries_are_rejected(tmp_path):
    tensor_path, bytes_path = tmp_path / "a", tmp_path / "b"
    dcp.save({"model": {"w": torch.ones(2)}, "payload": torch.ones(3)}, checkpoint_id=str(tensor_path))
    dcp.save({"model": {"w": torch.ones(2), "note": {"x": [1, 2]}}}, checkpoint_id=str(bytes_path))
    for path in (tensor_path, bytes_path):
        with pytest.raises(CheckpointError, match="unexpected entries"):
            load_tensors(path, {"model": {"w": torch.zeros(2)}})


def test_missing_entries_are_reported(tmp_path):
    path = _save(_store(tmp_path), 1)
    with pytest.raises(CheckpointError, match="lacks 1 entries"):
        load_tensors(path, {"model": {"w": torch.zeros(64, 64), "b": torch.zeros(8),
                                                      "extra": torch.zeros(1)}})


# ---- exit controller ------------------------------------------------------------------------------

_SINGLE = DistEnv(0, 0, 1, torch.device("cpu"), None, "single")


def _controller(**train) -> ExitController:
    cfg = TrainRunConfig(train=TrainConfig(**train), checkpoint=CheckpointConfig(exit_signals=["SIGUSR1", "SIGTERM"]))
    return ExitController(cfg, _SINGLE, start_step=10)


def test_exit_controller_signal_sets_flag_only():
    controller = _controller().install()
    try:
        assert controller.check(11) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal only sets the flag again
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert controller.received == signal.SIGTERM
        assert controller.check(12) == "signal"
    finally:
        controller.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_exit_controller_interval_and_duration():
    interval = _controller(exit_interval=5)
    assert interval.check(14) is None and interval.check(15) == "exit_interval"
    duration = _controller(exit_duration_min=0.01)  # 600 ms: room for a stall on a loaded CI machine
    assert duration.check(11) is None
    time.sleep(0.65)
    assert duration.check(11) == "exit_duration"


# ---- checkpointer: metadata, resume checks, weights-only -------------------------------------------


class _Iter:
    def __init__(self):
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _checkpointer(tmp_path: Path, d_model: int = 8, **ckpt) -> Checkpointer:
    cfg = TrainRunConfig(model=ModelConfig(d_model=d_model, vocab_size=16),
                         checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), **ckpt))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_model, d_model), nn.Linear(d_model, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, 100)
    store = CheckpointStore(tmp_path / "ckpt", cfg.checkpoint.keep_last, True, lambda: None, cfg.checkpoint.verify)
    return Checkpointer(cfg, store, [model], [optimizer], scheduler, _Iter(), TrainState(), torch.device("cpu"))


def _train_steps(ckpt: Checkpointer, steps: int) -> None:
    model, optimizer = ckpt.model_parts[0], ckpt.optimizers[0]
    for _ in range(steps):
        model(torch.randn(4, model[0].in_features)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ckpt.scheduler.step()
        ckpt.train_iter.position += 4
        ckpt.state.step += 1
        ckpt.state.consumed_tokens += 128


def test_metadata_carries_what_the_issue_lists(tmp_path):
    ckpt = _checkpointer(tmp_path)
    _train_steps(ckpt, 3)
    path = ckpt.save()
    meta = read_meta(path)
    assert meta["step"] == 3 and meta["consumed_tokens"] == 384
    assert meta["config_hash"] == config_hash(ckpt.cfg)
    assert meta["layout"] == {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1}
    assert meta["versions"]["torch"] == torch.__version__ and "trainrun" in meta["versions"]
    assert (path / MANIFEST_FILE).is_file() and meta["data"] == {"position": 12} and meta["kind"] == "persistent"
    json.dumps(meta)  # plain JSON: nothing is pickled


def test_resume_restores_everything_and_weights_only(tmp_path):
    saved = _checkpointer(tmp_path)
    _train_steps(saved, 3)
    saved.save()
    _train_steps(saved, 1)  # the reference continues
    full = _checkpointer(tmp_path)
    assert full.resume() == tmp_path / "ckpt" / "step_3"
    assert full.state.step == 3 and full.train_iter.position == 12
    _train_steps(full, 1)
    for a, b in zip(saved.model_parts[0].parameters(), full.model_parts[0].parameters(), strict=True):
        assert torch.equal(a, b)  # weights, moments, RNG and LR schedule all restored: bit-exact
    weights_only = _checkpointer(tmp_path, load_optimizer=False, resume=str(tmp_path / "ckpt" / "step_3"))
    assert weights_only.resume() == tmp_path / "ckpt" / "step_3"
    assert weights_only.state.step == 0 and weights_only.train_iter.position == 0
    assert not weights_only.optimizers[0].state  # a fresh optimizer, as for fine-tuning
    stored = {"model": {k: torch.zeros_like(v) for k, v in weights_only.model_parts[0].state_dict().items()}}
    load_tensors(tmp_path / "ckpt" / "step_3", stored)
    for name, value in weights_only.model_parts[0].state_dict().items():
        assert torch.equal(value, stored["model"][name])


def test_a_tensor_lr_saves_as_a_float_and_resume_keeps_this_runs_optimizer_flags(tmp_path):
    """A compiled (or graph-captured) optimizer holds its LR in a tensor and runs single-tensor or
    capturable; its checkpoint is plain JSON and loads into a foreach run as that run configured it."""
    saved = _checkpointer(tmp_path)
    lr_as_tensor(saved.optimizers[0])
    _train_steps(saved, 3)
    saved.optimizers[0].param_groups[0]["capturable"] = True  # as make_capturable leaves it (a CPU cannot step so)
    path = saved.save()
    meta = read_meta(path)
    json.dumps(meta)
    assert meta["scheduler"]["_last_lr"] == [pytest.approx(saved.scheduler.get_last_lr()[0].item())]
    lrs = {k: v for k, v in meta["optim_values"].items() if k.endswith(".lr")}
    assert lrs and all(isinstance(v, float) for v in lrs.values())
    resumed = _checkpointer(tmp_path)
    assert resumed.resume() == path
    for group in resumed.optimizers[0].param_groups:
        assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(lrs[next(iter(lrs))])
        assert group["foreach"] is None and group["capturable"] is False  # this run's own, not the saver's
    _train_steps(resumed, 1)  # and it steps (a tensor LR would be refused by a foreach AdamW)


def test_resume_path_may_name_a_checkpoint_dir_and_is_verified(tmp_path):
    saved = _checkpointer(tmp_path)
    _train_steps(saved, 2)
    saved.save()
    by_dir = _checkpointer(tmp_path / "other", resume=str(tmp_path / "ckpt"))
    assert by_dir.resume() == tmp_path / "ckpt" / "step_2"
    (tmp_path / "ckpt" / "step_2" / ".metadata").unlink()
    broken = _checkpointer(tmp_path / "other2", resume=str(tmp_path / "ckpt" / "step_2"))
    with pytest.raises(ConfigError, match="not a complete trainrun checkpoint"):
        broken.resume()


def test_changed_model_shape_is_refused_before_loading(tmp_path, monkeypatch):
    saved = _checkpointer(tmp_path)
    saved.save()
    loads = []
    monkeypatch.setattr("trainrun.checkpoint.checkpointer.load_tensors", lambda *a: loads.append(a))
    with pytest.raises(ConfigError, match=r"model\.d_model.*has model\.d_model=8"):
        _checkpointer(tmp_path, d_model=16).resume()
    assert not loads
    with pytest.raises(ConfigError, match="vocab_size"):
        check_model_compatible({"vocab_size": 16}, ModelConfig(vocab_size=32), tmp_path)


def test_changed_safe_settings_warn(tmp_path, caplog):
    saved = _checkpointer(tmp_path)
    saved.save()
    resumed = _checkpointer(tmp_path)
    resumed.cfg = dataclasses.replace(resumed.cfg, optim=dataclasses.replace(resumed.cfg.optim, lr=0.5),
                                      train=dataclasses.replace(resumed.cfg.train, max_steps=999))
    with caplog.at_level(logging.WARNING):
        resumed.resume()
    assert "resuming with changed settings" in caplog.text
    assert "optim.lr" in caplog.text and "train.max_steps" in caplog.text
    assert changed_settings({"a": {"b": 1}}, {"a": {"b": 2}}) == ["a.b: 1 -> 2"]


def test_newer_non_persistent_checkpoint_wins(tmp_path):
    ckpt = _checkpointer(tmp_path, non_persistent_interval=1, non_persistent_dir=str(tmp_path / "local"))
    ckpt.local_store = CheckpointStore(tmp_path / "local", 1, True, lambda: None)
    _train_steps(ckpt, 2)
    ckpt.save(SaveKind.PERSISTENT)
    for _ in range(3):
        _train_steps(ckpt, 1)
        ckpt.save(SaveKind.NON_PERSISTENT)
    assert [p.name for p in ckpt.local_store.directory.checkpoints()] == ["step_5"]  # newest only
    fresh = _checkpointer(tmp_path, non_persistent_interval=1, non_persistent_dir=str(tmp_path / "local"))
    fresh.local_store = CheckpointStore(tmp_path / "local", 1, True, lambda: None)

    def first_candidate() -> Path:  # what a resume of ``fresh`` would load first
        return next(ResumeChooser(fresh.cfg.checkpoint, [fresh.store.directory, fresh.local_store.directory])
                    .candidates()).path

    assert first_candidate() == tmp_path / "local" / "step_5"
    _train_steps(ckpt, 1)
    ckpt.save(SaveKind.PERSISTENT)
    assert first_candidate() == tmp_path / "ckpt" / "step_6"


def test_checkpointer_protects_best_and_resumed(tmp_path):
    ckpt = _checkpointer(tmp_path, keep_last=1, async_save=True)
    _train_steps(ckpt, 1)
    ckpt.save(blocking=True)
    ckpt.resumed_from = tmp_path / "ckpt" / "step_1"
    _train_steps(ckpt, 1)
    ckpt.state.best_checkpoint_step = 2
    ckpt.save(blocking=True)
    for _ in range(3):
        _train_steps(ckpt, 1)
        ckpt.save()  # async
        ckpt.wait_for_staging()
    ckpt.close()
    assert [p.name for p in ckpt.store.directory.checkpoints()] == ["step_1", "step_2", "step_5"]


def _stack_global_payload(module: str, name: str, *args: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(*args)`` (name may be a dotted attribute path)."""
    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    call_args = b"(" + b"".join(text(a) for a in args) + b"t"  # MARK ... TUPLE
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + call_args + b"R."  # STACK_GLOBAL, REDUCE, STOP


_ALLOWED_MODULES = sorted({m for m, _ in __import__("trainrun.checkpoint.safe_reader", fromlist=["x"]).ALLOWED_GLOBALS})


@pytest.mark.parametrize("payload_name", [
    *(f"chain:{m}" for m in _ALLOWED_MODULES),  # os.system reached through an attribute chain of each allowed module
    "builtins.eval", "builtins.exec", "builtins.getattr", "builtins.__import__", "os.system", "subprocess.Popen",
    "torch.load", "torch.serialization.load", "torch.distributed.checkpoint.metadata.os",
    "reduce", "not_a_pickle", "empty", "json", "truncated", "persistent_id", "a_list",
])
def test_crafted_metadata_is_refused_before_anything_runs(tmp_path, payload_name):
    from trainrun.checkpoint.safe_reader import UnsafeCheckpointError, load_metadata

    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    if payload_name.startswith("chain:"):
        payload = _stack_global_payload(payload_name.split(":", 1)[1], "os.system", command)
    elif payload_name == "reduce":
        payload = pickle.dumps(_Evil(marker))
    elif payload_name == "not_a_pickle":
        payload = os.urandom(256)
    elif payload_name == "empty":
        payload = b""
    elif payload_name == "json":
        payload = b'{"state_dict_metadata": {}}'
    elif payload_name == "truncated":
        dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "real"))
        payload = (tmp_path / "real" / ".metadata").read_bytes()[:40]
    elif payload_name == "persistent_id":
        payload = b"\x80\x04\x8c\x01xQ."  # BINPERSID
    elif payload_name == "a_list":
        payload = pickle.dumps([1, 2, 3])
    else:
        module, _, name = payload_name.rpartition(".")
        payload = _stack_global_payload(module, name, command)
    with pytest.raises(UnsafeCheckpointError):
        load_metadata(io.BytesIO(payload), "crafted/.metadata")
    assert not marker.exists()


def test_real_metadata_of_model_and_optimizer_loads(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trainrun.checkpoint.safe_reader import load_metadata

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(3, dtype=torch.int64),
              "half": torch.ones(2, dtype=torch.bfloat16)}, checkpoint_id=str(tmp_path / "c"))
    with open(tmp_path / "c" / ".metadata", "rb") as fh:
        metadata = load_metadata(fh, "c/.metadata")
    assert "model.0.weight" in metadata.state_dict_metadata



@pytest.mark.parametrize("tamper", ["trainrun_json", "no_manifest", "unlisted_file", "broken_manifest"])
def test_every_file_is_verified_and_a_missing_manifest_is_not_trusted(tmp_path, tamper):
    """trainrun.json (step, data position, LR state) is covered like the shards; no manifest means unverified."""
    path = _save(_store(tmp_path), 2)
    if tamper == "trainrun_json":  # same size, other step: only the hash can tell
        text = (path / META_FILE).read_text()
        (path / META_FILE).write_text(text.replace('"step": 2', '"step": 7'))
    elif tamper == "no_manifest":
        (path / MANIFEST_FILE).unlink()
    elif tamper == "unlisted_file":
        (path / "__9_0.distcp").write_bytes(b"x")
    else:
        (path / MANIFEST_FILE).write_text("{not json")
    problem = verify_checkpoint(path, "sha256")
    assert problem is not None
    expected = {"trainrun_json": "sha256", "no_manifest": "is missing", "unlisted_file": "__9_0.distcp",
                "broken_manifest": "unreadable"}[tamper]
    assert expected in problem
    assert verify_checkpoint(path, "none") is None  # the explicit opt-out still loads it


# ---- branches, rollbacks, requeues (commit order decides) ------------------------------------------


def _resume_fresh(tmp_path: Path, **ckpt) -> Checkpointer:
    """A new process's checkpointer (same run dir) after ``resume()``."""
    fresh = _checkpointer(tmp_path, **ckpt)
    fresh.resume()
    return fresh


def test_rollback_branch_wins_resume_and_retention_and_requeue(tmp_path):
    first = _checkpointer(tmp_path)
    for _ in range(3):
        _train_steps(first, 2)
        first.save()  # steps 2, 4, 6
    step_2 = tmp_path / "ckpt" / "step_2"
    # Roll back to step 2 (a loss spike after it): explicit path, first start.
    rolled = _resume_fresh(tmp_path, keep_last=2, resume=str(step_2))
    assert rolled.resumed_from == step_2 and rolled.state.step == 2
    _train_steps(rolled, 1)
    rolled.save()  # step 3 on the new branch: newer than step 6 although its step is lower
    assert [p.name for p in rolled.store.directory.in_commit_order()][:2] == ["step_3", "step_6"]
    # Retention keeps the current branch (and the resumed-from step 2); the abandoned step 4 goes first.
    assert sorted(p.name for p in rolled.store.directory.checkpoints()) == ["step_2", "step_3", "step_6"]
    # A requeue with the same command line continues the branch; it does not go back to step 2 forever.
    requeued = _resume_fresh(tmp_path, keep_last=2, resume=str(step_2))
    assert requeued.resumed_from == tmp_path / "ckpt" / "step_3" and requeued.state.step == 3
    # resume=auto agrees: the branch committed last, not the highest step.
    assert _resume_fresh(tmp_path, keep_last=2).resumed_from == tmp_path / "ckpt" / "step_3"


def test_requeue_before_the_branch_committed_repeats_the_explicit_resume(tmp_path):
    first = _checkpointer(tmp_path)
    _train_steps(first, 2)
    first.save()
    _train_steps(first, 2)
    first.save()
    step_2 = tmp_path / "ckpt" / "step_2"
    assert _resume_fresh(tmp_path, resume=str(step_2)).resumed_from == step_2
    assert _resume_fresh(tmp_path, resume=str(step_2)).resumed_from == step_2  # nothing committed in between


def test_weights_only_resume_applies_to_the_first_start_only(tmp_path):
    first = _checkpointer(tmp_path)
    _train_steps(first, 4)
    first.save()
    tuned = _resume_fresh(tmp_path, load_optimizer=False)
    assert tuned.state.step == 0 and tuned.train_iter.position == 0  # weights only: counters start over
    _train_steps(tuned, 1)
    tuned.save()  # step_1 of the fine-tuning branch
    requeued = _resume_fresh(tmp_path, load_optimizer=False)
    # The requeue restores the fine-tuning run's own full state instead of restarting it from step_4's weights.
    assert requeued.resumed_from == tmp_path / "ckpt" / "step_1"
    assert requeued.state.step == 1 and requeued.train_iter.position == 4
    assert requeued.optimizers[0].state  # optimizer moments restored
    assert read_meta(tmp_path / "ckpt" / "step_1")["origin"] == {"resume": "auto",
                                                                                 "load_optimizer": False}


def test_checkpoint_that_verifies_but_fails_to_load_falls_back(tmp_path, caplog):
    writer = _checkpointer(tmp_path, verify="size")
    _train_steps(writer, 2)
    writer.save()
    _train_steps(writer, 2)
    newest = writer.save()
    metadata = newest / ".metadata"
    metadata.write_bytes(b"\x00" * metadata.stat().st_size)  # same size: size-only verification passes
    assert verify_checkpoint(newest, "size") is None
    with caplog.at_level(logging.WARNING):
        fresh = _resume_fresh(tmp_path, verify="size")
    assert fresh.resumed_from == tmp_path / "ckpt" / "step_2" and fresh.state.step == 2
    assert "verified but failed to load" in caplog.text
    # An explicit path has nothing to fall back to: exit 2 with the reason.
    with pytest.raises(ConfigError, match="unusable DCP metadata"):
        _resume_fresh(tmp_path, verify="size", resume=str(newest))


def test_resave_killed_between_its_renames_is_recovered(tmp_path):
    store = _store(tmp_path)
    _save(store, 3)
    _save(store, 5)
    # A re-save of step 3 moved the old copy aside and was killed before the new copy took its name.
    os.replace(tmp_path / "step_3", tmp_path / ".old_step_3")
    (tmp_path / ".tmp_step_3").mkdir()
    store.directory.recover()
    assert (tmp_path / "step_3").is_dir() and not (tmp_path / ".old_step_3").exists()
    assert verify_checkpoint(tmp_path / "step_3", "sha256") is None
    # The next save cleans temp dirs but never the only copy of a step.
    os.replace(tmp_path / "step_3", tmp_path / ".old_step_3")
    _save(store, 7)
    assert verify_checkpoint(tmp_path / "step_3", "sha256") is None
    assert not (tmp_path / ".tmp_step_3").exists()


def test_resume_recovers_a_resave_killed_between_its_renames(tmp_path):
    saved = _checkpointer(tmp_path)
    for _ in range(2):
        _train_steps(saved, 2)
        saved.save()
    step_4 = tmp_path / "ckpt" / "step_4"
    os.replace(step_4, tmp_path / "ckpt" / ".old_step_4")  # the newest step's only copy, mid re-save
    assert _resume_fresh(tmp_path).resumed_from == step_4


def test_best_checkpoint_is_set_on_commit_and_stays_protected_when_a_better_save_fails(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path, keep_last=1)
    _train_steps(ckpt, 1)
    ckpt.save(best=True)
    assert ckpt.state.best_checkpoint_step == 1

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(dcp, "save", no_space)
        _train_steps(ckpt, 1)
        with pytest.raises(CheckpointError):
            ckpt.save(best=True)
    assert ckpt.state.best_checkpoint_step == 1  # never points at an uncommitted step
    for _ in range(2):
        _train_steps(ckpt, 1)
        ckpt.save()
    assert [p.name for p in ckpt.store.directory.checkpoints()] == ["step_1", "step_4"]  # the best survives keep_last=1


def test_async_best_becomes_best_when_committed(tmp_path):
    ckpt = _checkpointer(tmp_path, async_save=True)
    _train_steps(ckpt, 1)
    ckpt.save(best=True)
    assert ckpt.state.best_checkpoint_step is None  # not committed yet
    ckpt.close()
    assert ckpt.state.best_checkpoint_step == 1
    assert read_meta(tmp_path / "ckpt" / "step_1")["train_state"]["best_checkpoint_step"] == 1


@pytest.mark.parametrize("local", ["same", "inside"])
def test_non_persistent_dir_inside_the_persistent_one_is_refused(tmp_path, local):
    from trainrun.checkpoint.paths import check_non_persistent_dir

    persistent = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="checkpoint.non_persistent_dir"):
        check_non_persistent_dir(persistent if local == "same" else persistent / "fast", persistent, nodes=1)
    check_non_persistent_dir(tmp_path / "fast", persistent, nodes=1)
    check_non_persistent_dir(tmp_path / "fast", persistent, nodes=2)  # each node keeps its own (node_local)
    with pytest.raises(ConfigError, match="checkpoint.non_persistent_dir"):  # also on several nodes
        check_non_persistent_dir(persistent / "fast", persistent, nodes=2)


def test_exit_save_follows_exit_verify_and_still_resumes_under_sha256(tmp_path):
    ckpt = _checkpointer(tmp_path, exit_verify="size")
    _train_steps(ckpt, 1)
    periodic = ckpt.save()
    _train_steps(ckpt, 1)
    exit_path = ckpt.save(exit_save=True)
    assert all("sha256" in e for e in json.loads((periodic / MANIFEST_FILE).read_text()).values())
    assert not any("sha256" in e for e in json.loads((exit_path / MANIFEST_FILE).read_text()).values())
    assert _resume_fresh(tmp_path).resumed_from == exit_path  # sizes checked, nothing hashed


# ---- work a user's action must not destroy (issue 15) ---------------------------------------------


def test_non_persistent_saves_do_not_reset_the_time_policy_clock(tmp_path):
    ckpt = _checkpointer(tmp_path, non_persistent_interval=1, non_persistent_dir=str(tmp_path / "local"))
    ckpt.local_store = CheckpointStore(tmp_path / "local", 1, True, lambda: None)
    started = ckpt.last_persistent_save_time
    time.sleep(0.01)
    _train_steps(ckpt, 1)
    ckpt.save(SaveKind.NON_PERSISTENT)
    assert ckpt.last_persistent_save_time == started  # the time policy still counts from the start
    ckpt.save(SaveKind.PERSISTENT)
    assert ckpt.last_persistent_save_time > started


def test_a_failed_persistent_save_does_not_reset_the_time_policy_clock(tmp_path, monkeypatch):
    ckpt = _checkpointer(tmp_path)
    started = ckpt.last_persistent_save_time
    time.sleep(0.01)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", no_space)
    with pytest.raises(CheckpointError):
        ckpt.save()
    assert ckpt.last_persistent_save_time == started  # the time policy asks again at the next step
    monkeypatch.undo()
    ckpt.save()
    assert ckpt.last_persistent_save_time > started


def test_an_intact_checkpoint_of_another_shape_is_a_config_error_not_a_fallback(tmp_path, monkeypatch):
    """Tensor shapes are compared with the checkpoint's before loading, also for fields SHAPE_KEYS does not name."""
    saved = _checkpointer(tmp_path)
    _train_steps(saved, 2)
    saved.save()
    _train_steps(saved, 2)
    saved.save()
    monkeypatch.setattr("trainrun.checkpoint.resume.SHAPE_KEYS", ())  # as for a plugin model's own field
    other = _checkpointer(tmp_path, d_model=16)
    with pytest.raises(ConfigError, match=r"model\.d_model.*other shapes.*d_model=8"):
        other.resume()
    assert other.state.step == 0
    assert sorted(p.name for p in other.store.directory.checkpoints()) == ["step_2", "step_4"]


def test_learned_position_table_length_is_part_of_the_shape():
    saved = dataclasses.asdict(ModelConfig(position="learned", max_seq_len=64, vocab_size=16))
    with pytest.raises(ConfigError, match=r"model\.max_seq_len.*has model\.max_seq_len=64"):
        check_model_compatible(saved, ModelConfig(position="learned", max_seq_len=128, vocab_size=16), Path("c"))
    check_model_compatible({**saved, "position": "rope"}, ModelConfig(max_seq_len=128, vocab_size=16), Path("c"))


def test_a_run_never_starts_from_scratch_over_checkpoints_it_cannot_use(tmp_path, caplog):
    saved = _checkpointer(tmp_path)
    for _ in range(2):
        _train_steps(saved, 2)
        saved.save()
    for step_dir in (tmp_path / "ckpt").glob("step_*"):
        _data_file(step_dir).write_bytes(b"garbage")  # every checkpoint damaged
    fresh = _checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="2 checkpoint.* could not be used.*refusing to train from scratch"):
        fresh.resume()
    assert sorted(p.name for p in fresh.store.directory.checkpoints()) == ["step_2", "step_4"]


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    from trainrun.checkpoint.resume import check_checkpoints_before_build

    saved = _checkpointer(tmp_path)
    _train_steps(saved, 2)
    saved.save()
    cfg = dataclasses.replace(saved.cfg, checkpoint=dataclasses.replace(saved.cfg.checkpoint, resume="never"))
    with pytest.raises(ConfigError, match=r"checkpoint\.resume.*already holds 1 checkpoint.*step 2"):
        check_checkpoints_before_build(cfg, tmp_path)
    empty = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(tmp_path / "new")))
    check_checkpoints_before_build(empty, tmp_path)


def test_shape_refusal_comes_before_the_model_is_built(tmp_path):
    from trainrun.checkpoint.resume import check_checkpoints_before_build

    saved = _checkpointer(tmp_path)
    saved.save()
    cfg = dataclasses.replace(saved.cfg, model=dataclasses.replace(saved.cfg.model, d_model=16))
    with pytest.raises(ConfigError, match=r"model\.d_model"):
        check_checkpoints_before_build(cfg, tmp_path)


def test_a_second_ctrl_c_raises_and_only_then(tmp_path):
    cfg = TrainRunConfig(checkpoint=CheckpointConfig(exit_signals=["SIGINT"]))
    with ExitController(cfg, _SINGLE, start_step=0) as controller:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert controller.check(1) == "signal" and not controller.aborted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert controller.aborted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_dcp_wrapped_keyboard_interrupt_is_not_a_failed_save(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    def interrupted(*args, **kwargs):
        raise CheckpointException("save", {0: (KeyboardInterrupt(), [])})

    monkeypatch.setattr(dcp, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(_store(tmp_path), 1)
    assert not list(tmp_path.glob("step_*")) and not list(tmp_path.glob(".tmp_step_*"))


def test_runs_sharing_a_non_persistent_dir_keep_their_own_folders(tmp_path):
    """A new run pointed at the same fast disk must not resume (or prune) another run's non-persistent
    checkpoints; the same run (requeued, relaunched) finds its own again."""
    from trainrun.checkpoint.paths import non_persistent_dir

    cfg = TrainRunConfig()
    cfg.checkpoint.non_persistent_dir = str(tmp_path / "fast")
    first, second = non_persistent_dir(cfg, tmp_path / "run_a"), non_persistent_dir(cfg, tmp_path / "run_b")
    assert first != second and first.parent == second.parent == tmp_path / "fast"
    assert non_persistent_dir(cfg, tmp_path / "run_a" / ".." / "run_a") == first
