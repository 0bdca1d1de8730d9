#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for trying trainrun's Slurm launcher on one machine and for
# the tests. Installs Debian's slurmctld/slurmd/munge when missing (needs root, as in CI), writes
# its config and state under a scratch directory, and starts munged, slurmctld and slurmd.
#
#   launchers/local_slurm/start.sh            # scratch dir: $TRAINRUN_SLURM_DIR or /tmp/trainrun-slurm
#   sinfo; srun -n2 hostname                  # use it
#   launchers/local_slurm/stop.sh             # stops only what start.sh started (by pid file)
#
# Prints `export SLURM_CONF=...`; the tests and the README eval it. Idempotent: a running cluster
# with the same scratch dir is left alone.
set -euo pipefail
SCRATCH=${TRAINRUN_SLURM_DIR:-/tmp/trainrun-slurm}
CTLD_PORT=${TRAINRUN_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${TRAINRUN_SLURMD_PORT:-16818}
CONF="$SCRATCH/slurm.conf"

log() { echo "local_slurm: $*" >&2; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if running "$SCRATCH/slurmctld.pid" && running "$SCRATCH/slurmd.pid"; then
    log "already running in $SCRATCH"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

mkdir -p "$SCRATCH"/{state,spool,log}
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (Debian packages; log: $SCRATCH/log/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >"$SCRATCH/log/apt.log" 2>&1 \
        || { tail -20 "$SCRATCH/log/apt.log" >&2; exit 1; }
fi

HOST=$(hostname)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: Debian's package creates the key; a fresh machine may lack /run/munge (munged then
# refuses to start and every Slurm command fails with "Munge encode failed").
MUNGE_PID="$SCRATCH/munged.pid"
if ! running "$MUNGE_PID"; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key >&2 2>/dev/null || \
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    munged --force --pid-file="$MUNGE_PID" 2>"$SCRATCH/log/munged.err" || \
        { log "munged failed: $(cat "$SCRATCH/log/munged.err")"; exit 1; }
    # munged writes its pid file when it has daemonised
    for _ in $(seq 50); do [ -s "$MUNGE_PID" ] && break; sleep 0.1; done
fi

cat > "$CONF" <<CONF
# Written by launchers/local_slurm/start.sh: a one-node cluster on loopback.
ClusterName=trainrun-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$CONF"
slurmctld -c -f "$CONF" >&2
slurmd -c -f "$CONF" >&2
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        log "up: $(sinfo -h -o '%P %D %T %C' | head -1) (config $CONF)"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.2
done
log "slurm did not come up; see $SCRATCH/log/"
tail -20 "$SCRATCH/log/slurmctld.log" "$SCRATCH/log/slurmd.log" >&2 || true
exit 1
