"""What happened to a run directory, and who is writing to it.

``<run dir>/trainrun_status.json`` records each attempt's outcome (finished, resume, failed, ...):
a sweep launched again skips its finished points and resumes the others, and ``trainrun-report``
reads it. ``<run dir>/.trainrun.lock`` is held (``flock``) for the whole run, so two processes
never train into the same directory at once; the kernel drops the lock when a process dies, so a
killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from trainrun.config.errors import ConfigError

STATUS_FILE = "trainrun_status.json"
LOCK_FILE = ".trainrun.lock"


def read_status(run_dir: Path) -> dict:
    """The recorded status of ``run_dir`` ({} when it never ran to an end)."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def is_finished(run_dir: Path) -> bool:
    """The run reached its last step (exit code 0) in some attempt."""
    return read_status(run_dir).get("status") == "finished"


def record_status(run_dir: Path, status: str, exit_code: int, started: float | None = None) -> dict:
    """Append this attempt (it began at ``started``, a ``time.time()``) to the status file, atomically replaced."""
    previous = read_status(run_dir)
    now = time.time()
    attempts = previous.get("attempts", []) + [
        {"status": status, "exit_code": exit_code, "started": now if started is None else started, "time": now,
         "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}]
    status_doc = {"status": status, "exit_code": exit_code, "attempts": attempts,
                  "requeues": sum(1 for a in attempts if a["status"] == "resume")}
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(status_doc, indent=1))
    os.replace(tmp, run_dir / STATUS_FILE)
    return status_doc


class RunDirLock:
    """An exclusive, non-blocking ``flock`` on ``<run dir>/.trainrun.lock`` held for the whole run.

    Only one process per run takes it (rank 0 of a multi-process run, before the other ranks
    could write anything of their own).
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError("hydra.run.dir", str(self.path.parent),
                              f"is in use by {holder}; wait for it to end or use another run directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
