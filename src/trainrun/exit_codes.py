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
    PEER_LOST = 5
    """A peer rank died or stopped answering (a collective or the rendezvous store failed); this rank names it
    on stderr and in train.log. Nothing new was saved: requeue to resume from the last committed checkpoint."""
    HUNG = 6
    """The hang watchdog (parallel.hang_timeout_s) found a rank, the rendezvous store or every rank's progress
    stuck; each live rank wrote its Python stacks to <run dir>/hang/. Nothing new was saved: requeue to resume
    from the last committed checkpoint, and read the stacks if it repeats."""
    INTERRUPTED = 130
    """Stopped at once by a second Ctrl-C (or one before training was set up to save); the save in progress, if
    any, was dropped, checkpoints committed before it are intact: run the same command again to resume."""

    @property
    def asks_to_be_requeued(self) -> bool:
        """A launcher that can requeue should: the run stopped early after saving (3), or lost a peer (5) or
        hung (6) and resumes from its last committed checkpoint. torchrun.sbatch reads the same set."""
        return self in (ExitCode.RESUME, ExitCode.PEER_LOST, ExitCode.HUNG)
