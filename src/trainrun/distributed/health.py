"""Peer health of a multi-process run: heartbeats, the hang watchdog, and what a lost peer looks like.

Every rank runs a :class:`HealthMonitor` once the process group exists. It depends on no collective:

* a *beat* thread publishes this rank's heartbeat (pid, current step, a progress counter the
  main thread bumps at step, eval and save boundaries, and a status) to the rendezvous store every
  ``parallel.heartbeat_interval_s`` through a client of its own (a ``TCPStore`` to MASTER_ADDR:MASTER_PORT
  with a run-unique ``PrefixStore`` prefix), and reads every rank's heartbeat back in one ``multi_get``;
* a *judge* thread decides from what the beat thread saw, so a store that stops answering (its
  host is stopped: a store read then blocks until the host runs again, whatever the client's
  timeout) is noticed as well. It flags, each after ``parallel.hang_timeout_s``:
  (a) a rank whose heartbeat stopped changing (a stopped process, a node gone),
  (b) the store itself not answering (its host is stuck),
  (c) no rank progressing while every heartbeat is fresh (a collective deadlock; armed once training
  steps began and while every rank is still running).

On a hang every live rank logs which rank and host is stuck and at which step, writes its own Python
stacks to ``<run dir>/hang/rank<R>-<time>.txt``, flushes its logs and leaves with exit code 6
(:attr:`~trainrun.exit_codes.ExitCode.HUNG`) through ``os._exit``: its main thread is stuck in a collective.

Where the store lives: under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) in the torchrun agent of
the first node; under env:// without torchrun (Slurm, plain processes) in rank 0's process.

:func:`is_peer_failure` is the one place that decides whether an error means a peer was lost; the
entry point turns such an error into exit code 5 (:attr:`~trainrun.exit_codes.ExitCode.PEER_LOST`),
with :meth:`HealthMonitor.explain` naming the rank that stopped answering.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from trainrun.config.schema import ParallelConfig
from trainrun.distributed.env import DistEnv
from trainrun.errors import first_line
from trainrun.exit_codes import ExitCode

logger = logging.getLogger(__name__)

_PEER_FAILURE_WORDS = (
    "connection closed by peer",  # gloo: the peer's socket closed (process killed, node gone)
    "connection reset by peer",
    "broken pipe",
    "application timeout caused pair closure",  # gloo: a pair closed after an earlier timeout
    "timed out waiting",  # gloo: "Timed out waiting <ms> for recv operation to complete"
    "wait timeout after",  # the store: a key a peer never set
    "nccl communicator was aborted",
    "watchdog caught collective operation timeout",
)
"""Lower-case fragments of ``RuntimeError`` messages that mean a peer died or stopped answering."""


def _chain(err: BaseException | None):
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_peer_failure(err: BaseException) -> bool:
    """True when ``err`` (or an error it was raised from) says a peer process died or stopped answering:
    ``torch.distributed.DistError`` and its kinds (network, store, backend errors), a gloo or NCCL
    error about a closed connection or a timeout, or a :class:`PeerLostError`."""
    for cause in _chain(err):
        if isinstance(cause, (PeerLostError, dist.DistError)):
            return True
        if isinstance(cause, RuntimeError) and any(w in str(cause).lower() for w in _PEER_FAILURE_WORDS):
            return True
    return False


class PeerLostError(RuntimeError):
    """A collective or the store failed because a peer died or stopped answering; nothing new was saved."""

    exit_code = ExitCode.PEER_LOST

    def __init__(self, who: str, rank: int | None, step: int | None, cause: BaseException):
        self.who, self.rank, self.step = who, rank, step
        here = f"; this rank ({rank}) was at step {step}" if rank is not None else ""
        super().__init__(f"{who}{here} ({type(cause).__name__}: {first_line(cause)[:300]})")

    def line(self) -> str:
        """The one line the entry point logs (stderr on every rank, train.log on rank 0)."""
        return (f"peer lost: {self}; nothing new was saved; exit code {int(ExitCode.PEER_LOST)} "
                f"(PEER_LOST): requeue to resume from the last committed checkpoint")


def peer_lost_line(err: BaseException) -> str:
    """The stderr line for a peer failure: the monitor's diagnosis when one was made, else the error itself."""
    for cause in _chain(err):
        if isinstance(cause, PeerLostError):
            return cause.line()
    return PeerLostError("a peer stopped answering (which one is unknown: no health monitor ran)", None, None,
                         err).line()


@dataclass
class Heartbeat:
    """What one rank publishes every heartbeat interval."""

    rank: int
    pid: int
    step: int
    """The step this rank last reported (0 before training)."""
    beat: int
    """Heartbeat counter: a reader sees the rank alive while it changes."""
    progress: int
    """Progress counter the main thread bumps at step, eval and save boundaries (0: training not begun)."""
    status: str = "running"
    """running, done (reached the end of its run) or failed (left with an error)."""


@dataclass
class _Seen:
    """The newest heartbeat of a rank and when (this process's monotonic clock) it and its progress last changed."""

    beat: Heartbeat
    changed_at: float
    progressed_at: float


class NoHealthMonitor:
    """The monitor of a one-process run (or with the watchdog and heartbeats off): does nothing."""

    def mark_progress(self, step: int) -> None:
        """Nothing to report to."""

    def stop(self, status: str = "done") -> None:
        """Nothing to stop."""

    def explain(self, err: BaseException) -> PeerLostError | None:
        """None: no heartbeats to name a lost peer from (the entry point still classifies ``err``)."""
        return None


class HealthMonitor:
    """Heartbeats of every rank through the rendezvous store and the hang watchdog (see the module docstring)."""

    def __init__(self, parallel: ParallelConfig, env: DistEnv, run_dir: Path, store: dist.Store,
                 store_where: str, store_in_rank0: bool):
        self.env, self.run_dir, self.store, self.store_where = env, run_dir, store, store_where
        self.store_in_rank0 = store_in_rank0
        """env:// without torchrun: the store lives in rank 0's process, so a silent store means rank 0 is stuck."""
        self.interval, self.hang_timeout = parallel.heartbeat_interval_s, parallel.hang_timeout_s
        self._me = Heartbeat(env.rank, os.getpid(), 0, 0, 0)
        self._seen: dict[int, _Seen] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._standing_down = False
        self._store_ok_at = time.monotonic()
        self._store_error: str | None = None
        self._started_at = time.monotonic()
        self._threads: list[threading.Thread] = []

    # ---- start and stop -----------------------------------------------------------------
    @classmethod
    def start(cls, parallel: ParallelConfig, env: DistEnv, run_dir: Path) -> HealthMonitor | NoHealthMonitor:
        """Start the monitor of a multi-process run (every rank calls it at the same point: it meets the
        others once, to agree on the store prefix); a :class:`NoHealthMonitor` in one process."""
        if not env.distributed or env.world_size < 2:
            return NoHealthMonitor()
        prefix = f"trainrun/health/{env.broadcast_object(uuid.uuid4().hex)}/"
        store, where, in_rank0 = _store_client(parallel)
        monitor = cls(parallel, env, run_dir, dist.PrefixStore(prefix, store), where, in_rank0)
        monitor._publish()
        env.barrier()  # every rank's heartbeat key exists: reads never wait for a key
        monitor._read()
        monitor._threads = [threading.Thread(target=monitor._beat_loop, name="trainrun-heartbeat", daemon=True)]
        if monitor.hang_timeout > 0:
            monitor._threads.append(threading.Thread(target=monitor._judge_loop, name="trainrun-hang-watchdog",
                                                     daemon=True))
        for thread in monitor._threads:
            thread.start()
        logger.info("health monitor: heartbeat every %gs through the store at %s; hang watchdog %s",
                    monitor.interval, where, f"after {monitor.hang_timeout:g}s" if monitor.hang_timeout else "off")
        return monitor

    def stop(self, status: str = "done") -> None:
        """Stop both threads and publish a last heartbeat with ``status`` (done or failed); before the
        process group is destroyed. A beat thread stuck on an unanswering store is left behind (a daemon)."""
        self._standing_down = True
        self._stopping.set()
        self._me.status = status
        with contextlib.suppress(Exception):  # the store may be gone with its host; nothing to tell then
            self._publish()
        for thread in self._threads:
            thread.join(timeout=1.0)

    # ---- the main thread's side -----------------------------------------------------------
    def mark_progress(self, step: int) -> None:
        """The main thread passed a step, eval or save boundary at ``step`` (published with the next beat)."""
        self._me.step = step
        self._me.progress += 1

    def explain(self, err: BaseException) -> PeerLostError | None:
        """For a peer failure, a :class:`PeerLostError` naming the rank(s) and host(s) that stopped answering
        (waiting up to ~3.5 heartbeat intervals for a killed rank's heartbeat to go stale); else None."""
        if not is_peer_failure(err) or isinstance(err, PeerLostError):
            return None
        self._standing_down = True  # the watchdog must not race the peer-loss exit
        deadline = time.monotonic() + 3.5 * self.interval
        while True:
            who = self._lost_peers()
            if who or time.monotonic() >= deadline:
                break
            time.sleep(min(0.2, self.interval / 4))
        return PeerLostError(who or "a peer stopped answering (every heartbeat looked fresh)", self.env.rank,
                             self._me.step, err)

    def _lost_peers(self) -> str:
        """The ranks that look lost now: failed or stale heartbeats, or the store's host if the store fails."""
        now = time.monotonic()
        with self._lock:
            seen = dict(self._seen)
            store_ok_at, store_error = self._store_ok_at, self._store_error
        if store_error is not None or now - store_ok_at > 2.5 * self.interval:
            return self._store_host_lost(now - store_ok_at, seen, store_error)
        lost = []
        for rank, s in sorted(seen.items()):
            if rank == self.env.rank or s.beat.status == "done":
                continue
            if s.beat.status == "failed":
                lost.append(f"rank {rank} (host {self.env.host_of(rank)}) failed with an error (see its log), "
                            f"last at step {s.beat.step}")
            elif now - s.changed_at > 2.5 * self.interval:
                lost.append(f"rank {rank} (host {self.env.host_of(rank)}) stopped answering "
                            f"(no heartbeat for {now - s.changed_at:.1f}s), last at step {s.beat.step}")
        return "; ".join(lost)

    def _store_host_lost(self, silent_s: float, seen: dict[int, _Seen], error: str | None) -> str:
        what = f"failed ({error})" if error else f"did not answer for {silent_s:.1f}s"
        store = f"the rendezvous store at {self.store_where} {what}"
        if not self.store_in_rank0:
            return store
        rank0 = seen.get(0)
        last = f", last at step {rank0.beat.step}" if rank0 else ""
        return f"rank 0 (host {self.env.host_of(0)}) stopped answering{last}: {store}"

    # ---- the beat thread ------------------------------------------------------------------
    def _publish(self) -> None:
        self._me.beat += 1
        self.store.set(f"hb/{self.env.rank}", json.dumps(asdict(self._me)))

    def _read(self) -> None:
        values = self.store.multi_get([f"hb/{r}" for r in range(self.env.world_size)])
        now = time.monotonic()
        with self._lock:
            for raw in values:
                beat = Heartbeat(**json.loads(raw))
                old = self._seen.get(beat.rank)
                if old is None:
                    self._seen[beat.rank] = _Seen(beat, now, now)
                    continue
                changed = now if beat.beat != old.beat.beat else old.changed_at
                progressed = now if beat.progress != old.beat.progress else old.progressed_at
                self._seen[beat.rank] = _Seen(beat, changed, progressed)
            self._store_ok_at, self._store_error = now, None

    def _beat_loop(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._publish()
                self._read()
            except Exception as err:  # noqa: BLE001 - a store that fails is what the judge looks for
                with self._lock:
                    self._store_error = f"{type(err).__name__}: {first_line(err)[:200]}"

    # ---- the judge thread -----------------------------------------------------------------
    def _judge_loop(self) -> None:
        while not self._stopping.wait(min(1.0, self.interval / 2)):
            verdict = self._hang_verdict()
            if verdict and not self._standing_down:
                self._exit_hung(verdict)

    def _hang_verdict(self) -> str | None:
        """What is stuck, in words, or None while nothing has been stuck for hang_timeout_s."""
        now, limit = time.monotonic(), self.hang_timeout
        with self._lock:
            seen = dict(self._seen)
            store_ok_at, store_error = self._store_ok_at, self._store_error
        if now - store_ok_at > limit:
            return self._store_host_lost(now - store_ok_at, seen, store_error)
        if now - store_ok_at > 2 * self.interval + 1:
            return None  # the store is slow right now: the heartbeats read are not current
        running = {r: s for r, s in seen.items() if s.beat.status == "running"}
        stale = [f"rank {r} (host {self.env.host_of(r)}) sent no heartbeat for {now - s.changed_at:.1f}s, "
                 f"last at step {s.beat.step}" for r, s in sorted(running.items())
                 if r != self.env.rank and now - s.changed_at > limit]
        if stale:
            return "; ".join(stale)
        began = any(s.beat.progress > 0 for s in seen.values())
        if began and len(running) == len(seen):
            last_progress = max(s.progressed_at for s in seen.values())
            if now - last_progress > limit:
                steps = " ".join(f"{r}:{s.beat.step}" for r, s in sorted(seen.items()))
                return (f"no rank progressed for {now - last_progress:.1f}s while every heartbeat is fresh "
                        f"(a collective deadlock?); steps by rank {steps}")
        return None

    def _exit_hung(self, verdict: str) -> None:
        """Log what is stuck, write this process's stacks, flush, and leave with exit code 6 (HUNG)."""
        stacks = self.run_dir / "hang" / f"rank{self.env.rank}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        try:
            stacks.parent.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w") as out:
                out.write(f"rank {self.env.rank} host {self.env.host_of(self.env.rank)} pid {os.getpid()} "
                          f"step {self._me.step}: {verdict}\n\n")
                out.flush()
                faulthandler.dump_traceback(file=out, all_threads=True)
        except OSError as err:
            stacks = Path(f"(not written: {err})")
        logger.error("hang detected: %s (parallel.hang_timeout_s=%g); this is rank %d (host %s) at step %d; "
                     "Python stacks in %s; exit code %d (HUNG): requeue to resume from the last committed checkpoint",
                     verdict, self.hang_timeout, self.env.rank, self.env.host_of(self.env.rank), self._me.step, stacks,
                     ExitCode.HUNG)
        for hook in list(LAST_WORDS):
            try:
                hook(ExitCode.HUNG)
            except Exception as err:  # noqa: BLE001 - leaving matters more than any one hook
                logger.error("before exiting on the hang: %s failed: %s", getattr(hook, "__name__", hook), err)
        _flush_logs()
        os._exit(int(ExitCode.HUNG))


LAST_WORDS: list[Callable[[ExitCode], object]] = []
"""What the entry point must still do when the watchdog ends the process with ``os._exit`` (no ``finally``
runs then): record the attempt's outcome, ask Slurm to requeue the job. Each is called with the exit code."""


def _store_client(parallel: ParallelConfig) -> tuple[dist.Store, str, bool]:
    """A client of its own to the rendezvous store, with a short timeout; where that store lives, in words; and
    whether it lives in rank 0's process (env:// without torchrun's agent store).

    Not the default group's store: the main thread may be blocked on that client (a store-based barrier),
    and changing its timeout would change the main thread's.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=max(1.0, 2 * parallel.heartbeat_interval_s))
    store = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    in_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return store, f"{addr}:{port} ({'in the torchrun agent' if in_agent else 'in rank 0'})", not in_agent


def _flush_logs() -> None:
    """Flush our log handlers and the standard streams; leaving matters more than a failed flush."""
    for flushable in [*logging.getLogger().handlers, *logging.getLogger("trainrun").handlers, sys.stdout, sys.stderr]:
        with contextlib.suppress(Exception):
            flushable.flush()
