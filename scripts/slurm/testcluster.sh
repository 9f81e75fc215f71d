#!/usr/bin/env bash
# A one-node SLURM cluster in a private folder, for tests/test_slurm.py (as root, no systemd):
#
#   scripts/slurm/testcluster.sh up DIR     # install slurm-wlm + munge with apt when missing, start
#                                           # munged, slurmctld and slurmd; prints SLURM_CONF=DIR/slurm.conf
#   scripts/slurm/testcluster.sh down DIR   # stop the three daemons started by `up DIR`
#
# Everything (key, socket, state, spool, logs, PID files) lives under DIR, and the ports are free
# ones, so the cluster leaves the host's own /etc/slurm and /etc/munge alone. KillWait is 10 s (the
# grace between SIGTERM and SIGKILL), so a requeue test waits 10 s, not 30; cred_expire=10 lets a
# requeued job start again after 10 s instead of 120, and the scheduling loops every 1-2 s (not 30
# and 60) start it as soon as that hold ends.
set -euo pipefail

cmd=${1:?usage: testcluster.sh up|down DIR}
dir=${2:?usage: testcluster.sh up|down DIR}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

stop_pid() {  # stop the daemon whose PID file is $1 (it is ours: the file is in DIR)
    local file=$1 pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

case $cmd in
up)
    if [[ $(id -u) != 0 ]]; then echo "testcluster.sh: must run as root (slurmd and munged)" >&2; exit 2; fi
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
        echo "testcluster.sh: installing slurm-wlm and munge with apt-get" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
    fi
    dir=$(realpath -m "$dir")
    mkdir -p "$dir"/{munge/key,state,spool,log,run}
    chmod 755 "$dir" "$dir/munge"  # the socket's folder: everyone may reach it
    chown -R munge: "$dir/munge"
    chmod 700 "$dir/munge/key"  # the key's: munge only
    if [[ ! -s $dir/munge/key/munge.key ]]; then
        head -c 1024 /dev/urandom >"$dir/munge/key/munge.key"
        chown munge: "$dir/munge/key/munge.key"
        chmod 400 "$dir/munge/key/munge.key"
    fi
    runuser -u munge -- munged --key-file="$dir/munge/key/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
    host=$(hostname -s)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=aimtest
SlurmctldHost=$host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
JobRequeue=1
InactiveLimit=0
Waittime=0
NodeName=$host CPUs=$(nproc) RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    mkdir -p "$dir/spool/$host"
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    export SLURM_CONF=$dir/slurm.conf
    for _ in $(seq 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
            echo "SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 1
    done
    echo "testcluster.sh: the node did not come up; see $dir/log" >&2
    exit 1
    ;;
down)
    dir=$(realpath -m "$dir")
    stop_pid "$dir/run/slurmd.pid"
    stop_pid "$dir/run/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
    ;;
*)
    echo "usage: testcluster.sh up|down DIR" >&2
    exit 2
    ;;
esac
