"""Requeue the Slurm job this process runs in, the way submitit's own preemption handler does.

A submitit job that *returns* is finished for submitit (it writes the result file the launcher
waits for), so a job that stopped early to be resumed (exit code 3) must instead ask Slurm to
requeue it and leave without a result: ``scontrol requeue <job id>``, then ``SystemExit``. The
requeued job runs the same pickled call again, in the same run directory, and resumes from the
checkpoint it saved.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time

logger = logging.getLogger(__name__)

REQUEUE_TRIES = 3
REQUEUE_RETRY_S = 2.0


def slurm_job_id() -> str | None:
    """This job's id as ``scontrol`` names it (``<array job>_<task>`` for array tasks), or None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]


def in_submitit_job() -> bool:
    """This process runs a job that submitit submitted (its pickled call is being executed)."""
    return "SUBMITIT_FOLDER" in os.environ or "SUBMITIT_EXECUTOR" in os.environ


def requeue_this_job(any_rank: bool = False) -> bool:
    """``scontrol requeue`` this job; True when Slurm accepted it (or, on a rank that leaves it to rank 0, when
    there is a job).

    After a save every rank is alive and only global rank 0 asks. After a lost peer or a hang
    (``any_rank``) rank 0 may be the one that is gone, so every surviving rank asks; Slurm takes the
    first request and answers the others "pending execution", which counts as requeued.
    """
    job = slurm_job_id()
    if job is None or (not any_rank and int(os.environ.get("SLURM_PROCID", "0")) != 0):
        return job is not None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        logger.error("cannot requeue Slurm job %s: scontrol is not on PATH", job)
        return False
    for attempt in range(REQUEUE_TRIES):
        proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            logger.info("requeued Slurm job %s; it resumes from its newest committed checkpoint", job)
            return True
        if "pending" in proc.stderr.lower():
            # Requeued already: by another surviving rank, or by Slurm itself (an operator's `scontrol
            # requeue`, a failed node), whose SIGTERM is what stopped this run.
            logger.info("Slurm job %s is requeued already; it resumes from its newest committed checkpoint", job)
            return True
        # A busy controller answers "Socket timed out" or "temporarily unavailable": ask again.
        logger.warning("scontrol requeue %s failed (try %d of %d): %s", job, attempt + 1, REQUEUE_TRIES,
                       proc.stderr.strip())
        time.sleep(REQUEUE_RETRY_S)
    logger.error("could not requeue Slurm job %s; launch the same command again to resume", job)
    return False
