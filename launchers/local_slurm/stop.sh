#!/usr/bin/env bash
# Stops the one-node cluster that start.sh started: slurmd, slurmctld and munged, by their pid files
# in the scratch directory (never by name, so nothing else on the machine is touched).
set -uo pipefail
SCRATCH=${TRAINRUN_SLURM_DIR:-/tmp/trainrun-slurm}
for name in slurmd slurmctld munged; do
    pidfile="$SCRATCH/$name.pid"
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "local_slurm: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
done
