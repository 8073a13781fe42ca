#!/usr/bin/env bash
# A throw-away Slurm (munged + slurmctld + slurmd) for tests and CI: one node, or two virtual
# nodes n1 and n2 on this one machine.
#
#   tests/slurm/harness.sh start   install what is missing, configure, start, wait for idle nodes
#   tests/slurm/harness.sh stop    cancel jobs, stop the daemons this harness started
#   tests/slurm/harness.sh status  exit 0 when the nodes answer jobs
#   tests/slurm/harness.sh env     print `export SLURM_CONF=...` for sbatch/srun/sinfo
#
# Knobs (environment):
#   PCASGD_SLURM_NODES 1 or 2; unset: 1, except that `stop` then stops both clusters
#   PCASGD_SLURM_DIR   state, logs and slurm.conf  (default /tmp/pcasgd-slurm, /tmp/pcasgd-slurm-2nodes)
#   PCASGD_SLURM_CPUS  CPUs each node advertises   (default 8, 4 per node with 2; may exceed the real cores)
#   PCASGD_SLURM_PORT  slurmctld port; slurmd uses PORT+1 (PORT+1, PORT+2 with 2 nodes)
#                      (default 16817, 16827 with 2 nodes: both clusters can run at once)
#   PCASGD_SLURM_WAIT  seconds to wait for idle nodes (default 90)
#
# Two nodes: each slurmd runs in its own UTS namespace with its hostname set to its node name, so
# the ranks of a job see two hosts. Without that, Open MPI's PMIx looks up the ranks of "its node"
# under the real hostname, finds none, and a node with 3+ ranks fails in MPI_Init. Messages between
# the nodes then go over TCP. Ranks on both nodes share one filesystem, as on a real cluster.
#
# Exit codes: 0 ok, 1 failure, 3 Slurm could not be installed (no apt-get, or apt-get failed).
# Starting twice is harmless: running daemons are kept unless slurm.conf changed.
# Needs root (apt-get, unshare, and daemons that run jobs as any user).
set -euo pipefail

NODES=${PCASGD_SLURM_NODES:-1}
case $NODES in
    1) NAMES=("$(hostname -s)"); DEFAULT_DIR=/tmp/pcasgd-slurm; DEFAULT_CPUS=8; DEFAULT_PORT=16817 ;;
    2) NAMES=(n1 n2); DEFAULT_DIR=/tmp/pcasgd-slurm-2nodes; DEFAULT_CPUS=4; DEFAULT_PORT=16827 ;;
    *) echo "PCASGD_SLURM_NODES must be 1 or 2, got '$NODES'" >&2; exit 2 ;;
esac
DIR=${PCASGD_SLURM_DIR:-$DEFAULT_DIR}
CPUS=${PCASGD_SLURM_CPUS:-$DEFAULT_CPUS}
PORT=${PCASGD_SLURM_PORT:-$DEFAULT_PORT}
WAIT=${PCASGD_SLURM_WAIT:-90}
CONF=$DIR/slurm.conf
SOCK=$DIR/run/munge.sock
HOST=$(hostname -s)
export SLURM_CONF=$CONF

TAG=slurm-harness
((NODES == 1)) || TAG+=" $NODES nodes"
log() { echo "[$TAG] $*" >&2; }

# The pid in a pid file, if that process is alive and is ours (its command line names our files),
# so a stale pid file never makes us signal an unrelated process.
ourpid() {
    local pid
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" && echo "$pid"
}

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge libpmix2) missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || { log "apt-get not found: cannot install ${missing[*]}"; exit 3; }
    log "installing ${missing[*]}"
    # Without systemd, the packages' postinst would start a munged/slurmd of their own from /etc.
    local guard=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive timeout 120 apt-get update -qq &&
        # Another install may hold the dpkg lock (two harness modes starting at once): wait for it.
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends \
            -o DPkg::Lock::Timeout=120 "${missing[@]}"
    } >"$DIR/log/apt.log" 2>&1 || rc=$?
    ((guard)) && rm -f /usr/sbin/policy-rc.d
    if ((rc)); then
        log "apt-get failed (exit $rc):"; tail -20 "$DIR/log/apt.log" >&2; exit 3
    fi
}

# Slurm's mpi/pmix plugin dlopen()s .../pmix2/lib/libpmix.so, a name only libpmix-dev provides
# (with a pile of -dev dependencies); the versioned library next to it is the same file.
link_libpmix() {
    local so
    so=$(dpkg -L libpmix2 2>/dev/null | grep -m1 '/pmix2/lib/libpmix\.so\.2$') || return 0
    [[ -e ${so%.2} ]] || ln -sfn libpmix.so.2 "${so%.2}"
}

# One NodeName line per node, each slurmd on its own port. The nodes share the machine's memory.
node_lines() {
    local mem=$1 i
    ((NODES == 1)) || mem=$((mem / NODES))
    for i in "${!NAMES[@]}"; do
        echo "NodeName=${NAMES[i]} NodeHostname=${NAMES[i]} NodeAddr=127.0.0.1 Port=$((PORT + 1 + i))" \
            "CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    done
}

write_config() {
    local mem new=$CONF.new
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    # auth/munge talks to our munged through its socket, so a system munged (if any) is not used.
    # config_overrides lets slurmd accept CPUS > real cores: an MPI test wants more ranks than cores.
    # Without cgroups in a container: linuxproc tracking, no task binding (binding 4 ranks to
    # 2 cores would pin pairs together anyway).
    # MinJobAge: sbatch --wait sleeps 2 s, then 8 s, and quadruples the sleep while it is below
    # MinJobAge/2 (up to 32 s), so the default 300 s adds up to half a minute of latency. At 16 it
    # polls every 8 s while finished jobs stay known for >= 16 s, long enough to be seen
    # (a job purged before sbatch looks makes --wait fail).
    # TmpFS: the pmix plugin makes its per-step folder there (spmix_appdir_<uid>_<job>.<step>); in
    # /tmp, two nodes on one machine, or two clusters numbering jobs alike, would make the same one.
    # cred_expire: a requeued job may start again only after this (default 120 s); 30 s still
    # leaves a slow, shared machine time to launch a step with its credential.
    cat >"$new" <<EOF
ClusterName=pcasgd
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
MinJobAge=16
$(node_lines "$mem")
PartitionName=debug Nodes=$(IFS=,; echo "${NAMES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$new" "$CONF"; then rm -f "$new"; return 1; fi
    mv "$new" "$CONF"
}

any_alive() {
    local pid
    for pid; do [[ -d /proc/$pid ]] && return 0; done
    return 1
}

# stop_daemons NAME...: TERM them all, then KILL whatever is left after 10 s.
stop_daemons() {
    local name pid pids=() names=()
    for name; do
        if pid=$(ourpid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$name")
        fi
        rm -f "$DIR/run/$name.pid"
    done
    for _ in $(seq 50); do any_alive "${pids[@]}" || break; sleep 0.2; done
    for i in "${!pids[@]}"; do
        if [[ -d /proc/${pids[i]} ]]; then
            log "${names[i]} (${pids[i]}) ignored SIGTERM"; kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
        log "${names[i]} (${pids[i]}) stopped"
    done
}

# launch NAME CMD...: run a daemon in the foreground of its own session (it outlives this
# script and no terminal signal reaches it), then wait for it to write its pid file.
launch() {
    local name=$1; shift
    if ourpid "$name" >/dev/null; then return 0; fi
    rm -f "$DIR/run/$name.pid"
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 9>&- &
    for _ in $(seq 100); do
        ourpid "$name" >/dev/null && { log "$name started (pid $(ourpid "$name"))"; return 0; }
        sleep 0.1
    done
    log "$name did not start:"; tail -20 "$DIR/log/$name.out" >&2; exit 1
}

# One start or stop at a time: two at once would both launch (or kill) the same daemons.
# The daemons must not inherit the lock's descriptor (see launch), or it would never be released.
lock() {
    exec 9>>"$DIR/run/harness.lock"
    flock -w 600 9 || { log "timed out waiting for another harness.sh ($DIR/run/harness.lock)"; exit 1; }
}

# The slurmds by the names `launch` and `stop_daemons` take (their pid files: run/slurmd-<node>.pid).
# Stopping also tries plain "slurmd", the single pid file of earlier versions of this harness.
SLURMDS=("${NAMES[@]/#/slurmd-}")

node_works() {
    # sinfo reports the state saved from a previous run before slurmd has registered again,
    # so only a job that really ran proves the nodes work; --mpi=pmix also proves the plugin loads.
    timeout 30 srun --quiet --mpi=pmix -N"$NODES" --ntasks-per-node=1 -t 1 -J harness-probe true \
        2>>"$DIR/log/probe.err"
}

launch_slurmd() {
    local name=$1
    if ((NODES == 1)); then
        launch "slurmd-$name" slurmd -D -N "$name" -f "$CONF"
    else
        # exec: the pid file and the command line are slurmd's own, as `ourpid` expects.
        launch "slurmd-$name" unshare --uts sh -c "hostname $name && exec slurmd -D -N $name -f $CONF"
    fi
}

# "n1=idle n2=idle", in node order.
node_states() {
    timeout 10 sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true
}

# munged refuses a socket that not everyone can reach: every folder above it needs o+x.
socket_reachable() {
    local d
    d=$(cd "$(dirname "$SOCK")" && pwd -P)
    while [[ $d != / ]]; do
        if [[ $(stat -c %A "$d") != *[xt] ]]; then
            log "munged needs execute permission for all on every folder above its socket, and $d is" \
                "$(stat -c %A "$d"): chmod o+x $d (/tmp is normally drwxrwxrwt), or set PCASGD_SLURM_DIR elsewhere"
            exit 1
        fi
        d=$(dirname "$d")
    done
}

start() {
    mkdir -p "$DIR"/{state,spool,log,run,munge}
    lock
    install_packages
    link_libpmix
    if ((NODES > 1)) && ! unshare --uts true 2>/dev/null; then
        log "cannot create a UTS namespace (unshare --uts): two nodes need root with CAP_SYS_ADMIN"
        exit 1
    fi
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    if write_config; then
        log "config written: $CONF"
        stop_daemons slurmd "${SLURMDS[@]}" slurmctld
    fi

    ourpid munged >/dev/null || socket_reachable
    launch munged munged -F --socket="$SOCK" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    for _ in $(seq 50); do [[ -S $SOCK ]] && break; sleep 0.1; done
    launch slurmctld slurmctld -D -f "$CONF"
    local name
    for name in "${NAMES[@]}"; do
        mkdir -p "$DIR/spool/$name" "$DIR/tmp/$name"
        launch_slurmd "$name"
    done

    local deadline=$((SECONDS + WAIT)) states= ready
    while ((SECONDS < deadline)); do
        states=$(node_states)
        ready=1
        for name in "${NAMES[@]}"; do
            [[ " $states" =~ \ $name=(idle|mixed|allocated) ]] || ready=0
        done
        if ((ready)); then
            node_works && { log "up: $states"; return 0; }
        elif [[ $states =~ down|drain|fail ]]; then
            timeout 10 scontrol update NodeName="$(IFS=,; echo "${NAMES[*]}")" State=RESUME 2>/dev/null || true
        fi
        sleep 0.5
    done
    log "nodes not usable after ${WAIT} s (states: ${states:-none})"
    timeout 10 sinfo -R >&2 || true
    tail -n 15 "$DIR/log/probe.err" "$DIR/log/slurmctld.log" "$DIR"/log/slurmd*.log >&2 || true
    exit 1
}

stop() {
    [[ -d $DIR/run ]] || return 0
    lock
    # Cancel jobs first: their slurmstepd processes outlive slurmd by design.
    if ourpid slurmctld >/dev/null; then
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            timeout 10 scancel --full $jobs 2>/dev/null || true
            for _ in $(seq 50); do [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
        fi
    fi
    # munged last: the Slurm daemons may still talk to each other while shutting down.
    stop_daemons slurmd "${SLURMDS[@]}" slurmctld
    stop_daemons munged
}

all_alive() {
    local name
    for name; do ourpid "$name" >/dev/null || return 1; done
}

case ${1:-} in
    start) start ;;
    stop)
        if [[ -z ${PCASGD_SLURM_NODES:-} && -z ${PCASGD_SLURM_DIR:-} ]]; then
            # Both clusters at their default places, so one `stop` cleans up after any test run.
            PCASGD_SLURM_NODES=2 bash "$0" stop || true
        fi
        stop ;;
    status) all_alive munged slurmctld "${SLURMDS[@]}" && node_works ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
