"""What happened to a run directory, and who is writing to it.

``<run dir>/trainrun_status.json`` records each attempt's outcome (finished, resume, failed, ...):
a sweep launched again skips its finished points and resumes the others, and ``trainrun-report``
reads it. ``.trainrun.lock`` in the run directory and in every checkpoint directory is held
(``flock``) for the whole run, so two processes never write into the same directory at once (two
runs sharing one ``checkpoint.dir`` included); the kernel drops the locks when a process dies, so a
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

from trainrun.config.schema import TrainRunConfig
from trainrun.errors import RunEnvironmentError

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


def writer_dirs(cfg: TrainRunConfig, run_dir: Path) -> list[tuple[Path, str]]:
    """Every directory this run writes and no other run may write at the same time: (path, the option setting it)."""
    from trainrun.preflight import checkpoint_directories

    if cfg.run.dry_run:  # writes its log only
        return [(run_dir, "hydra.run.dir")]
    return [(run_dir, "hydra.run.dir")] + [(path, option) for path, option, _ in checkpoint_directories(cfg, run_dir)]


class RunDirLock:
    """Exclusive, non-blocking ``flock``s on ``<dir>/.trainrun.lock`` for each directory a run writes.

    Only one process per run takes them (rank 0 of a multi-process run, before the other ranks
    could write anything of their own). All or none: a refused run releases what it took.
    """

    def __init__(self, dirs: Path | list[tuple[Path, str]]):
        named = [(dirs, "hydra.run.dir")] if isinstance(dirs, Path) else dirs
        unique: dict[Path, tuple[Path, str]] = {}
        for directory, option in named:  # checkpoint.dir may name the run directory itself
            unique.setdefault(directory.resolve(), (directory, option))
        self.dirs = list(unique.values())
        self._fds: list[int] = []

    def __enter__(self) -> RunDirLock:
        try:
            for directory, option in self.dirs:
                self._lock(directory, option)
        except BaseException:
            self._release()
            raise
        return self

    def _lock(self, directory: Path, option: str) -> None:
        from trainrun.preflight import unwritable_dir_error

        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # the same one line the start-up checks give
            raise unwritable_dir_error(option, directory, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            # Another live run holds it: the user's environment, not a bad setting.
            raise RunEnvironmentError(f"{option} is in use by {holder}", str(directory),
                                      "wait for it to end or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fds.append(fd)

    def _release(self) -> None:
        for fd in self._fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release()
