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

logger = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """This job's id as ``scontrol`` names it (``<array job>_<task>`` for array tasks), or None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{array_task}" if array_job and array_task else os.environ["SLURM_JOB_ID"]


def in_submitit_job() -> bool:
    """This process runs a job that submitit submitted (its pickled call is being executed)."""
    return "SUBMITIT_FOLDER" in os.environ or "SUBMITIT_EXECUTOR" in os.environ


def requeue_this_job() -> bool:
    """``scontrol requeue`` this job (only global rank 0 asks); True when Slurm accepted it."""
    job = slurm_job_id()
    if job is None or int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return job is not None
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        logger.error("cannot requeue Slurm job %s: scontrol is not on PATH", job)
        return False
    proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        logger.error("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    logger.info("requeued Slurm job %s; it resumes from the checkpoint just saved", job)
    return True
