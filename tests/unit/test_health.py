"""Peer health: the settings' validation, the peer-failure classification, the hang verdicts (fast, no processes)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainrun.config.schema import LoggingConfig, ParallelConfig
from trainrun.config.suggest import unknown_key_message
from trainrun.distributed.env import DistEnv
from trainrun.distributed.health import (
    HealthMonitor,
    Heartbeat,
    NoHealthMonitor,
    PeerLostError,
    _Seen,
    is_peer_failure,
    peer_lost_line,
)
from trainrun.errors import CheckpointError, ConfigError
from trainrun.exit_codes import ExitCode


@pytest.mark.parametrize(("field", "value"), [
    ("collective_timeout_s", 0.0), ("collective_timeout_s", -1.0), ("heartbeat_interval_s", 0.0),
    ("hang_timeout_s", -1.0), ("hang_timeout_s", 2.0),  # under 3 heartbeats of the default 5 s
])
def test_bad_parallel_timeouts_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"parallel.{field}="):
        ParallelConfig(**{field: value}).validate()


def test_hang_watchdog_can_be_turned_off_and_defaults_are_sane():
    ParallelConfig(hang_timeout_s=0).validate()
    ParallelConfig(hang_timeout_s=3, heartbeat_interval_s=1).validate()
    defaults = ParallelConfig()
    assert defaults.collective_timeout_s < 30 * 60  # not the backends' 30 minutes
    assert defaults.hang_timeout_s >= 3 * defaults.heartbeat_interval_s


@pytest.mark.parametrize("ratio", [1.0, 0.5, -1.0])
def test_straggler_ratio_must_exceed_one_or_be_zero(ratio):
    with pytest.raises(ConfigError, match="logging.straggler_ratio="):
        LoggingConfig(straggler_ratio=ratio).validate()
    LoggingConfig(straggler_ratio=0).validate()
    LoggingConfig(straggler_ratio=1.2).validate()


def test_old_timeout_key_names_the_new_one():
    assert "parallel.collective_timeout_s" in unknown_key_message("parallel.timeout_min")


def test_exit_codes_are_distinct():
    assert (ExitCode.PEER_LOST, ExitCode.HUNG) == (5, 6)


GLOO_CLOSED = ("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:34714. "
               "This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("err", [
    RuntimeError(GLOO_CLOSED),
    RuntimeError("[pair.cc:537] Read error [127.0.0.1]:10155: Connection reset by peer."),
    RuntimeError("[unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete"),
    RuntimeError("Application timeout caused pair closure"),
    dist.DistStoreError("wait timeout after 2000ms, keys: /a"),
    dist.DistNetworkError("Broken pipe"),
    dist.DistBackendError("NCCL communicator was aborted on rank 1."),
], ids=lambda e: type(e).__name__)
def test_peer_failures_are_recognised(err):
    assert is_peer_failure(err)


def test_a_peer_failure_under_a_checkpoint_error_is_still_one():
    try:
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as inner:
            raise CheckpointError("saving step 4 failed") from inner
    except CheckpointError as err:
        assert is_peer_failure(err)


@pytest.mark.parametrize("err", [RuntimeError("CUDA out of memory"), ValueError("connection closed by peer"),
                                 CheckpointError("disk full"), KeyError("x")], ids=repr)
def test_other_errors_are_not_peer_failures(err):
    assert not is_peer_failure(err)


def test_peer_lost_line_says_what_to_do():
    line = PeerLostError("rank 1 (host n2) stopped answering", 0, 12, RuntimeError(GLOO_CLOSED)).line()
    assert line.startswith("peer lost: rank 1 (host n2) stopped answering; this rank (0) was at step 12")
    assert "exit code 5 (PEER_LOST)" in line and "last committed checkpoint" in line
    assert "which one is unknown" in peer_lost_line(RuntimeError(GLOO_CLOSED))
    assert NoHealthMonitor().explain(RuntimeError(GLOO_CLOSED)) is None


class _DictStore:
    """Stands in for the rendezvous store where a verdict is computed from what was seen."""

    def set(self, key, value):
        pass


def _monitor(tmp_path: Path, seen: dict[int, tuple[float, float, int, str]], store_age: float = 0.0,
             hang: float = 6.0, interval: float = 0.5) -> HealthMonitor:
    """A monitor of rank 0 that saw ``seen``: rank -> (seconds since its beat changed, since its progress
    changed, progress counter, status)."""
    env = DistEnv(0, 0, len(seen), torch.device("cpu"), "gloo", "torchrun", hosts=[f"n{r}" for r in range(len(seen))])
    m = HealthMonitor(ParallelConfig(hang_timeout_s=hang, heartbeat_interval_s=interval), env, tmp_path,
                      _DictStore(), "127.0.0.1:1 (in rank 0)", True)
    now = time.monotonic()
    m._seen = {r: _Seen(Heartbeat(r, 100 + r, 7, 1, progress, status), now - beat_age, now - prog_age)
               for r, (beat_age, prog_age, progress, status) in seen.items()}
    m._store_ok_at = now - store_age
    return m


def test_verdicts(tmp_path):
    fresh = (0.1, 0.1, 3, "running")
    assert _monitor(tmp_path, {0: fresh, 1: fresh})._hang_verdict() is None
    stopped = _monitor(tmp_path, {0: fresh, 1: (7.0, 7.0, 3, "running")})._hang_verdict()
    assert stopped.startswith("rank 1 (host n1) sent no heartbeat for 7.0s, last at step 7")
    store = _monitor(tmp_path, {0: fresh, 1: fresh}, store_age=7.0)._hang_verdict()
    assert store.startswith("rank 0 (host n0) stopped answering") and "did not answer for 7.0s" in store
    deadlock = _monitor(tmp_path, {0: (0.1, 7.0, 3, "running"), 1: (0.1, 8.0, 3, "running")})._hang_verdict()
    assert deadlock.startswith("no rank progressed for 7.0s while every heartbeat is fresh")
    # Before training begins (progress 0) and once a rank is done, no progress is asked for.
    assert _monitor(tmp_path, {0: (0.1, 9.0, 0, "running"), 1: (0.1, 9.0, 0, "running")})._hang_verdict() is None
    assert _monitor(tmp_path, {0: (0.1, 9.0, 3, "running"), 1: (9.0, 9.0, 3, "done")})._hang_verdict() is None


def test_lost_peer_diagnosis(tmp_path):
    fresh = (0.1, 0.1, 3, "running")
    assert _monitor(tmp_path, {0: fresh, 1: fresh})._lost_peers() == ""
    stale = _monitor(tmp_path, {0: fresh, 1: (2.0, 2.0, 3, "running")})._lost_peers()
    assert "rank 1 (host n1) stopped answering" in stale
    failed = _monitor(tmp_path, {0: fresh, 1: (0.1, 0.1, 3, "failed")})._lost_peers()
    assert "rank 1 (host n1) failed with an error" in failed
