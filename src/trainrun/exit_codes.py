"""Process exit codes that launchers and schedulers can act on."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Why trainrun stopped."""

    FINISHED = 0
    """Reached train.max_steps (or the dry run finished)."""
    FAILED = 1
    """An unexpected error; the traceback is in train.log and on stderr."""
    CONFIG_ERROR = 2
    """Bad configuration or input; one line on stderr names the field and the fix."""
    RESUME = 3
    """Stopped early on purpose (exit interval, signal, time limit) after saving: requeue to resume."""
    BAD_STEPS = 4
    """Too many consecutive non-finite steps (train.max_skipped_steps); nothing new was saved."""
    INTERRUPTED = 130
    """Stopped at once by a second Ctrl-C (or one before training was set up to save); the save in progress, if
    any, was dropped, checkpoints committed before it are intact: run the same command again to resume."""
