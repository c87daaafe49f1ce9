#!/usr/bin/env bash
# A Slurm cluster with accounting on this machine, for CI and local tests, without systemd:
#   tests/cluster/cluster.sh start|stop|status
# One host by default. With SPMD_SLURM_HOSTS=N (N >= 2) the compute nodes are N hosts of their own:
# each a Linux network namespace (veth pair on a bridge, its own address 10.77.0.1I/24, loopback of
# its own) with its own UTS namespace (hostname spmdhI), running its own slurmd (NodeName spmdhI,
# NodeAddr its address, spool/pid/log files per node); slurmctld, slurmdbd, MariaDB and munged stay in
# this machine's namespaces, reachable from the hosts at the bridge's 10.77.0.1. Every daemon of a
# host and every job step it starts see only that host's network and name, as on separate machines.
# start installs Debian's slurm-wlm, slurmdbd, munge, mariadb-server, libpmix-dev and iproute2 when missing,
# writes slurm.conf, slurmdbd.conf and cgroup.conf under $SPMD_SLURM_DIR (default /tmp/spmd-slurm-<uid>),
# then starts munged, MariaDB, slurmdbd, slurmctld and slurmd there, every one with its own socket,
# port, pid file and log in that directory: nothing under /etc or /run is touched, so a site's own
# Slurm on the same host is left alone. Clients find the cluster with
#   export SLURM_CONF=$SPMD_SLURM_DIR/etc/slurm.conf
# stop ends exactly the daemons that start started (by their pid files). Runs as root (CI does).
set -euo pipefail

DIR="${SPMD_SLURM_DIR:-/tmp/spmd-slurm-$(id -u)}"  # per user: never another user's files
PORT_BASE="${SPMD_SLURM_PORT_BASE:-16810}"   # ctld +7, slurmd +8, dbd +9, mariadb +6
CTLD_PORT=$((PORT_BASE + 7)) SLURMD_PORT=$((PORT_BASE + 8)) DBD_PORT=$((PORT_BASE + 9))
DB_PORT=$((PORT_BASE + 6))
# NodeName must be exactly `hostname`: Slurm hands it to PMIx as the node name, and Open MPI 5
# compares it with gethostname(); a mismatch makes every rank its own "node".
NODE="$(hostname)"
HOSTS="${SPMD_SLURM_HOSTS:-0}"                # 0: one host (this machine); N >= 2: N namespace hosts
NET="${SPMD_SLURM_NET:-10.77.0}"             # the hosts' /24: bridge .1, host I at .1I
BRIDGE="${SPMD_SLURM_BRIDGE:-spmdbr0}"
CLUSTER=spmdci
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)   # stop order (slurmd: one pid file per node)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server libpmix-dev iproute2)

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

have_all() {
  local cmd
  for cmd in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db ip nsenter unshare; do
    command -v "$cmd" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null || return 1
  done
  # the mpi/pmix plugin dlopens the unversioned libpmix.so, which only libpmix-dev ships
  compgen -G "/usr/lib/*/libpmix.so" >/dev/null
}

install_packages() {
  have_all && return 0
  command -v apt-get >/dev/null || die "missing Slurm/MariaDB/munge and no apt-get to install ${PACKAGES[*]}"
  log "installing ${PACKAGES[*]} (Debian packages, no recommends)"
  # keep package scripts from starting system-wide services; we start our own below
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${PACKAGES[@]}"; } >"$DIR/apt.log" 2>&1 || rc=$?
  [ "$own_policy" = 1 ] && rm -f "$policy"
  [ "$rc" = 0 ] || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
  have_all || die "installed ${PACKAGES[*]} but a daemon or libpmix.so is still missing"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s
wait_for() {
  local limit=$(($1 * 5)) i
  shift 2
  for ((i = 0; i < limit; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

# the pids of a daemon (slurmd: every node's)
pid_of() {
  local f out=()
  for f in "$DIR/run/$1.pid" "$DIR/run/$1"-*.pid; do [ -s "$f" ] && out+=("$(cat "$f")"); done
  [ "${#out[@]}" -gt 0 ] && echo "${out[*]}"
}
alive() { local p; for p in $(pid_of "$1"); do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

host_names() { local i; for ((i = 1; i <= HOSTS; i++)); do echo "spmdh$i"; done; }

write_configs() {
  local hw ctld_addr=127.0.0.1 nodes i
  # this host's real CPU/memory layout, so slurmd does not drain the node for a mismatch
  hw="$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*//")"
  nodes="NodeName=$NODE$hw NodeAddr=127.0.0.1 State=UNKNOWN"
  if [ "$HOSTS" -ge 2 ]; then
    ctld_addr="$NET.1"
    nodes=""
    for ((i = 1; i <= HOSTS; i++)); do
      nodes+="NodeName=spmdh$i$hw NodeAddr=$NET.1$i State=UNKNOWN"$'\n'
    done
  fi
  if [ "$HOSTS" -ge 2 ]; then
    # the hosts' /etc/hosts (bind-mounted in each host's mount namespace only): every node's name resolves
    # at once, as a cluster's DNS does; without it each lookup of a host's own name (gloo, c10d) waits
    # for this machine's name server to time out (~10 s a process) and gloo falls back to loopback
    { printf '127.0.0.1\tlocalhost\n%s.1\t%s\n' "$NET" "$NODE"
      for ((i = 1; i <= HOSTS; i++)); do printf '%s.1%s\tspmdh%s\n' "$NET" "$i" "$i"; done; } >"$DIR/etc/hosts"
  fi
  cat >"$DIR/etc/slurm.conf" <<EOF
# One-host test cluster written by tests/cluster/cluster.sh; all state under $DIR.
ClusterName=$CLUSTER
# addresses given, so nothing depends on the host name resolving
SlurmctldHost=$NODE($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# root in a container or a CI VM: daemons and jobs run as root
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
# %n: the node name, so the slurmd of each namespace host has files of its own
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups (none delegated to us, no systemd): track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
AccountingStorageType=accounting_storage/slurmdbd
# the namespace hosts reach slurmdbd at the bridge's address (sacct in their jobs), as they reach slurmctld
AccountingStorageHost=$ctld_addr
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections the munge socket is given here, not by AuthInfo
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# heterogeneous jobs start only from the backfill scheduler: run it every second, not every 30
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
$nodes
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# two more over the same nodes, for heterogeneous jobs whose components ask for different partitions
# (slurm/hybrid.sbatch: the orchestrator on cpu, the model ranks on gpu)
PartitionName=cpu Nodes=ALL MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
# slurmdbd of the test cluster: MariaDB on 127.0.0.1:$DB_PORT (TCP: slurmdbd has no socket option)
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=spmdci
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"   # slurmdbd refuses a config others can read
  mkdir -p "$DIR/pmix/here"
  cat >"$DIR/etc/mpi.conf" <<EOF
# srun --mpi=pmix: the PMIx client directories (namespace hosts: each host mounts its own here)
PMIxCliTmpDirBase=$DIR/pmix/here
EOF
  cat >"$DIR/etc/cgroup.conf" <<EOF
# No cgroup plugin is configured (proctrack/linuxproc, task/none, jobacct_gather/linux); this file
# only keeps slurmd from looking for one elsewhere.
CgroupPlugin=autodetect
EOF
}

start_munge() {
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  # --force: munged refuses to run as root or in a directory it does not consider private
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" \
    || die "munged did not start (log: $DIR/log/munged.log)"
  wait_for 10 munge munge --socket="$DIR/munge/munge.socket" -n || die "munged does not answer"
}

start_mariadb() {
  local db=(--no-defaults --user=root --datadir="$DIR/db")
  mariadb-install-db "${db[@]}" --skip-test-db --auth-root-authentication-method=socket \
    >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
  # small buffers: the accounting database of a test cluster is tiny
  setsid mariadbd "${db[@]}" --socket="$DIR/run/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadb mariadb-admin --no-defaults --socket="$DIR/run/mysqld.sock" ping \
    || die "MariaDB did not start (log: $DIR/log/mariadb.log)"
  mariadb --no-defaults --socket="$DIR/run/mysqld.sock" -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'spmdci';
    CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'spmdci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "cannot create the slurm database user"
}

start_slurm() {
  export SLURM_CONF="$DIR/etc/slurm.conf"
  slurmdbd </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "slurmdbd did not start (log: $DIR/log/slurmdbd.log)"
  wait_for 60 slurmdbd sacctmgr -i -n list cluster || die "slurmdbd does not answer (log: $DIR/log/slurmdbd.log)"
  # register the cluster before slurmctld first connects, so accounting starts with the first job
  sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
  slurmctld -i </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
  wait_for 30 slurmctld scontrol ping || die "slurmctld does not answer (log: $DIR/log/slurmctld.log)"
  local n names=("$NODE")
  [ "$HOSTS" -ge 2 ] && mapfile -t names < <(host_names)
  for n in "${names[@]}"; do
    mkdir -p "$DIR/spool/$n"
    if [ "$HOSTS" -ge 2 ]; then  # in the host's network namespace, under its own host name
      # nsenter, not `ip netns exec`: that one remounts /sys, hiding /sys/fs/cgroup from slurmd. A mount
      # namespace of its own only for PMIx's directory (mpi.conf), which is named by job and step, not
      # by node, and for /etc/hosts: the hosts share every other path, as nodes on a shared file system do
      mkdir -p "$DIR/pmix/$n"
      nsenter --net="/run/netns/spmd-$n" unshare --uts --mount --propagation private \
        sh -c "hostname $n && mount --bind $DIR/pmix/$n $DIR/pmix/here && mount --bind $DIR/etc/hosts /etc/hosts \
               && exec slurmd -N $n" \
        </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "slurmd of $n did not start (log: $DIR/log/slurmd-$n.log)"
    else
      slurmd -N "$n" </dev/null >>"$DIR/log/daemons.out" 2>&1 || die "slurmd did not start (log: $DIR/log/slurmd-$n.log)"
    fi
  done
  all_idle() { [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" = "${#names[@]}" ]; }  # a node per partition
  wait_for 60 slurmd all_idle || { sinfo -N -l >&2 || true; die "nodes ${names[*]} not all idle (logs: $DIR/log/slurmd-*.log)"; }
}

# The namespace hosts: a bridge with NET.1, and per host a namespace spmd-spmdhI whose eth0 (a veth
# whose other end is on the bridge) has NET.1I, its loopback up, and a default route via the bridge.
net_up() {
  command -v ip >/dev/null || die "SPMD_SLURM_HOSTS=$HOSTS needs iproute2 (ip)"
  net_down
  if ! { ip link add "$BRIDGE" type bridge && ip addr add "$NET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up; }; then
    die "cannot create bridge $BRIDGE (root, and a kernel with bridges and network namespaces?)"
  fi
  local i ns
  for ((i = 1; i <= HOSTS; i++)); do
    ns="spmd-spmdh$i"
    if ! { ip netns add "$ns" && ip link add "veth-spmdh$i" type veth peer name eth0 netns "$ns" &&
           ip link set "veth-spmdh$i" master "$BRIDGE" up &&
           ip -n "$ns" addr add "$NET.1$i/24" dev eth0 && ip -n "$ns" link set eth0 up &&
           ip -n "$ns" link set lo up && ip -n "$ns" route add default via "$NET.1"; }; then
      die "cannot set up host spmdh$i (namespace $ns)"
    fi
  done
}

net_down() {
  local i
  for ((i = 1; i <= 9; i++)); do
    ip netns del "spmd-spmdh$i" 2>/dev/null || true
    ip link del "veth-spmdh$i" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (the test cluster's daemons and jobs run as root)"
  if [ -d "$DIR/run" ] && any_alive; then log "a cluster is running under $DIR: stopping it first"; stop; fi
  rm -rf "$DIR"
  mkdir -p "$DIR"/{etc,run,log,state,spool,munge,db}
  chmod 700 "$DIR/munge"
  local t0=$SECONDS
  install_packages
  export PATH="$PATH:/usr/sbin"
  local p
  for p in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
    port_free "$p" || die "port $p is in use: set SPMD_SLURM_PORT_BASE to another base"
  done
  [ "$HOSTS" = 0 ] || [ "$HOSTS" -ge 2 ] || die "SPMD_SLURM_HOSTS=$HOSTS: 0 (one host) or at least 2"
  [ "$HOSTS" -ge 2 ] && net_up
  write_configs
  start_munge
  start_mariadb
  start_slurm
  log "up in $((SECONDS - t0)) s: nodes $(sinfo -h -p ci -o %N), export SLURM_CONF=$DIR/etc/slurm.conf"
}

any_alive() { local d; for d in "${DAEMONS[@]}"; do alive "$d" && return 0; done; return 1; }

stop() {
  # SIGTERM to every daemon at once (each shuts down on its own), then wait up to 15 s, then SIGKILL
  local d p i pids=()
  for d in "${DAEMONS[@]}"; do
    for p in $(pid_of "$d"); do
      kill -TERM "$p" 2>/dev/null && pids+=("$d:$p")
    done
  done
  for ((i = 0; i < 75; i++)); do
    local left=()
    for d in "${pids[@]}"; do kill -0 "${d#*:}" 2>/dev/null && left+=("$d"); done
    [ "${#left[@]}" = 0 ] && break
    sleep 0.2
  done
  for d in "${pids[@]}"; do
    if kill -0 "${d#*:}" 2>/dev/null; then log "${d%%:*} (${d#*:}) ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "${d#*:}" 2>/dev/null || true; fi
  done
  for d in "${DAEMONS[@]}"; do rm -f "$DIR/run/$d.pid" "$DIR/run/$d"-*.pid; done
  [ "$HOSTS" -ge 2 ] && net_down
  return 0
}

status() {
  local d rc=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d: running (pid $(pid_of "$d"))"; else echo "$d: stopped"; rc=3; fi
  done
  echo "SLURM_CONF=$DIR/etc/slurm.conf"
  if [ "$rc" = 0 ]; then SLURM_CONF="$DIR/etc/slurm.conf" PATH="$PATH:/usr/sbin" sinfo -N -l || rc=3; fi
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
