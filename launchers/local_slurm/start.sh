#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for trying trainrun's Slurm launchers and for the tests.
# Installs Debian's slurmctld/slurmd/munge when missing (needs root, as in CI), writes its config and
# state under a scratch directory and starts munged, slurmctld and one slurmd per node.
#
#   launchers/local_slurm/start.sh              # one node on loopback (the host itself)
#   launchers/local_slurm/start.sh --nodes 2    # nodes n1, n2, each in its own network, UTS and mount
#                                               # namespaces: own hostname and address on a host bridge,
#                                               # own node-local disk at $SCRATCH/local, the rest shared
#   sinfo; srun -N2 hostname                    # use it
#   launchers/local_slurm/stop.sh               # removes exactly what start.sh made
#
# Settings (environment): TRAINRUN_SLURM_DIR scratch dir (default /tmp/trainrun-slurm, one cluster per
# dir), TRAINRUN_SLURMCTLD_PORT / TRAINRUN_SLURMD_PORT, TRAINRUN_SLURM_SUBNET (first three octets of
# the nodes' addresses, default 10.77.0), TRAINRUN_SLURM_PREFIX (names of the namespaces, veths and
# bridge, default trainrun). Prints `export SLURM_CONF=...`; the tests and the docs eval it.
# Idempotent: a running cluster is left alone, a node whose slurmd stopped is started again.
set -euo pipefail
NODES=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "local_slurm: unknown argument $1 (use --nodes N)" >&2; exit 2 ;;
    esac
done
case "$NODES" in ''|*[!0-9]*|0) echo "local_slurm: --nodes must be a positive integer, got '$NODES'" >&2; exit 2 ;; esac

SCRATCH=${TRAINRUN_SLURM_DIR:-/tmp/trainrun-slurm}
CTLD_PORT=${TRAINRUN_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${TRAINRUN_SLURMD_PORT:-16818}
SUBNET=${TRAINRUN_SLURM_SUBNET:-10.77.0}
PREFIX=${TRAINRUN_SLURM_PREFIX:-trainrun}
BRIDGE="$PREFIX-br0"
CONF="$SCRATCH/slurm.conf"
MUNGE_SOCKET="$SCRATCH/munge/munge.socket"
LOCAL_DIR="$SCRATCH/local"   # the node-local disk's path, the same on every node

log() { echo "local_slurm: $*" >&2; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_names() { if [ "$NODES" -eq 1 ]; then hostname; else seq -f "n%g" 1 "$NODES"; fi; }
# What start.sh made, one line each, for stop.sh to remove exactly that (and nothing that was there before).
made() { grep -qxF "$1" "$SCRATCH/made" 2>/dev/null || echo "$1" >> "$SCRATCH/made"; }
ours() { grep -qxF "$1" "$SCRATCH/made" 2>/dev/null; }
# A namespace, link or bridge of this name that this cluster did not make belongs to someone else (another
# cluster, another tool): never reuse or remove it.
refuse_foreign() {
    log "$1 already exists and was not made by this cluster ($SCRATCH); choose other names with" \
        "TRAINRUN_SLURM_PREFIX=<name> and TRAINRUN_SLURM_SUBNET=<a.b.c> (or stop the cluster that made it)"
    exit 2
}

if [ -f "$CONF" ] && ! grep -q "^# nodes=$NODES\$" "$CONF" && running "$SCRATCH/slurmctld.pid"; then
    log "a cluster with another node count runs in $SCRATCH; stop it first (launchers/local_slurm/stop.sh)"
    exit 2
fi

mkdir -p "$SCRATCH"/{state,spool,log,munge} "$LOCAL_DIR"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (Debian packages; log: $SCRATCH/log/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge; } >"$SCRATCH/log/apt.log" 2>&1 \
        || { tail -20 "$SCRATCH/log/apt.log" >&2; exit 1; }
fi
if [ "$NODES" -gt 1 ]; then
    for tool in ip nsenter unshare; do
        command -v "$tool" >/dev/null || { log "--nodes $NODES needs '$tool' (iproute2 / util-linux)"; exit 1; }
    done
fi

if [ "$NODES" -gt 1 ]; then  # before starting anything
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ours "bridge $BRIDGE" || refuse_foreign "bridge $BRIDGE"
    elif ip -4 -o addr show | grep -q " $SUBNET.1/"; then
        refuse_foreign "address $SUBNET.1"
    fi
    for i in $(seq "$NODES"); do
        if ip netns list | grep -qE "^$PREFIX-n$i( |\$)"; then
            ours "netns $PREFIX-n$i" || refuse_foreign "network namespace $PREFIX-n$i"
        fi
        if ip link show "$PREFIX-v$i" >/dev/null 2>&1; then
            ours "link $PREFIX-v$i" || refuse_foreign "link $PREFIX-v$i"
        fi
    done
fi

HOST=$(hostname)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

# munge: the cluster's own munged on a socket in the scratch dir (every node sees the shared filesystem),
# so two clusters on one machine do not share one. Debian's package creates the key; a fresh machine may
# lack it.
MUNGE_PID="$SCRATCH/munged.pid"
if ! running "$MUNGE_PID"; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key >&2 2>/dev/null || \
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    chmod 755 "$SCRATCH" "$SCRATCH/munge"
    munged --force --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" --log-file="$SCRATCH/log/munged.log" \
        --seed-file="$SCRATCH/munge/munged.seed" 2>"$SCRATCH/log/munged.err" || \
        { log "munged failed: $(cat "$SCRATCH/log/munged.err")"; exit 1; }
    for _ in $(seq 50); do [ -s "$MUNGE_PID" ] && break; sleep 0.1; done  # written once daemonised
fi

# ---- the network: loopback for one node; a bridge and one namespace per node for several ----------
if [ "$NODES" -eq 1 ]; then
    CTLD_ADDR=127.0.0.1
else
    CTLD_ADDR="$SUBNET.1"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        made "bridge $BRIDGE"
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    # Every node resolves every node's name (as a cluster's DNS would): c10d and gloo look hostnames up.
    { grep -v "^$SUBNET\." /etc/hosts; echo "$CTLD_ADDR $HOST"; \
      for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) n$i"; done; } > "$SCRATCH/hosts"
    for i in $(seq "$NODES"); do
        ns="$PREFIX-n$i" veth="$PREFIX-v$i"
        if ! ip netns list | grep -qE "^$ns( |\$)"; then
            ip netns add "$ns"
            made "netns $ns"
        fi
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            made "link $veth"
            ip link set "$veth" master "$BRIDGE" up
            ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
            ip -n "$ns" link set eth0 up
            ip -n "$ns" link set lo up
        fi
        mkdir -p "$SCRATCH/nodes/n$i/local"
    done
fi

# ---- slurm.conf ---------------------------------------------------------------------------------
{
cat <<CONF
# Written by launchers/local_slurm/start.sh
# nodes=$NODES
ClusterName=trainrun-local
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool/%n
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.%n.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.%n.log
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
CONF
if [ "$NODES" -eq 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    echo "PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
else
    for i in $(seq "$NODES"); do
        echo "NodeName=n$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
fi
} > "$CONF.new"
# Rewritten only when it changed: a running slurmctld keeps reading the file it started with.
if ! cmp -s "$CONF.new" "$CONF"; then mv "$CONF.new" "$CONF"; else rm "$CONF.new"; fi

export SLURM_CONF="$CONF"
if ! running "$SCRATCH/slurmctld.pid"; then
    slurmctld -c -f "$CONF" >&2
fi
if [ "$NODES" -eq 1 ]; then
    running "$SCRATCH/slurmd.$HOST.pid" || slurmd -c -f "$CONF" >&2
else
    for i in $(seq "$NODES"); do
        running "$SCRATCH/slurmd.n$i.pid" && continue
        # nsenter, not `ip netns exec`: that remounts /sys and slurmd then finds no cgroup fs. The mount
        # namespace gives the node its own disk at $LOCAL_DIR and the cluster's /etc/hosts.
        nsenter --net="/run/netns/$PREFIX-n$i" unshare --uts --mount --propagation private sh -c "
            hostname n$i
            mount --bind '$SCRATCH/nodes/n$i/local' '$LOCAL_DIR'
            mount --bind '$SCRATCH/hosts' /etc/hosts
            exec slurmd -f '$CONF'" >&2
    done
fi

for _ in $(seq 150); do
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)' || true)
    if [ "$idle" -ge "$NODES" ]; then
        log "up: $(sinfo -h -o '%P %D %T %N' | head -1) (config $CONF; node-local disk at $LOCAL_DIR)"
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    # A node that was down (its slurmd stopped) comes back on its own with ReturnToService=2.
    sleep 0.2
done
log "slurm did not come up with $NODES node(s); see $SCRATCH/log/"
sinfo -N >&2 || true
tail -20 "$SCRATCH/log/slurmctld.log" "$SCRATCH"/log/slurmd.*.log >&2 || true
exit 1
