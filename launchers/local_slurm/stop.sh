#!/usr/bin/env bash
# Stops the cluster start.sh started and removes exactly what it made: every slurmd, slurmctld and munged
# by its pid file in the scratch directory (never by name, so nothing else on the machine is touched),
# the processes still running inside the nodes' namespaces, then the namespaces, veths and bridge that
# start.sh recorded in $SCRATCH/made. The scratch directory (logs, node-local disks) is kept.
set -uo pipefail
SCRATCH=${TRAINRUN_SLURM_DIR:-/tmp/trainrun-slurm}

stop_pid() {  # name pidfile
    local name=$1 pidfile=$2 pid
    if [ -f "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "local_slurm: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

for pidfile in "$SCRATCH"/slurmd.*.pid "$SCRATCH/slurmd.pid"; do
    [ -e "$pidfile" ] || continue
    name=$(basename "$pidfile" .pid)
    stop_pid "$name" "$pidfile"
done
stop_pid slurmctld "$SCRATCH/slurmctld.pid"
stop_pid munged "$SCRATCH/munged.pid"

if [ -f "$SCRATCH/made" ]; then
    # Job steps outlive slurmd; a node that goes away takes its processes with it.
    while read -r kind name; do
        [ "$kind" = netns ] || continue
        pids=$(ip netns pids "$name" 2>/dev/null)
        if [ -n "$pids" ]; then
            kill $pids 2>/dev/null
            sleep 1
            kill -9 $(ip netns pids "$name" 2>/dev/null) 2>/dev/null
            echo "local_slurm: stopped the processes left in $name" >&2
        fi
    done < "$SCRATCH/made"
    tac "$SCRATCH/made" | while read -r kind name; do
        case "$kind" in
            netns) ip netns del "$name" 2>/dev/null && echo "local_slurm: removed namespace $name" >&2 ;;
            link|bridge) ip link del "$name" 2>/dev/null && echo "local_slurm: removed $kind $name" >&2 ;;
        esac
    done
    rm -f "$SCRATCH/made"
fi
exit 0
