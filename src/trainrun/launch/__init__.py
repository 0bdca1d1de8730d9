"""Launching and sweeping: sweep point identity, run-directory locks and status, Slurm requeue."""
