#!/usr/bin/env bash
# A real two-node Slurm on this one host (munge + MariaDB + slurmdbd + slurmctld + two slurmd) for the
# test suite and CI.
#
#   scripts/slurm_local.sh start    install Debian's packages when missing, write the config, start the
#                                   daemons that are not running, wait until both nodes are idle
#   scripts/slurm_local.sh stop     stop every daemon this script started, by its recorded PID
#   scripts/slurm_local.sh status   exit 0 when every daemon runs and the node answers
#
# Needs root, Debian (apt-get) and no systemd; the daemons are started by hand. Exit codes: 0 ok,
# 1 failure, 2 "cannot run here" (not root / no apt-get / packages not installable) so callers can skip.
# See DESIGN.md section 7 for why each setting is what it is:
# - the in-job helper of snakemake-executor-plugin-slurm clears SLURM_*, so the config lives at the
#   default path /etc/slurm/slurm.conf (SLURM_CONF would be lost inside jobs);
# - without slurmdbd the plugin waits forever on sacct, so accounting runs on MariaDB;
# - no cgroups here: proctrack/linuxproc and task/none;
# - two fake GPUs per node (gres.conf File= on empty files) so GPU requests are really scheduled and accounted;
# - two nodes, <host>-1 and <host>-2, both this host (NodeHostname), each slurmd on its own Port= and
#   started with `slurmd -N <name>` (own spool dir, PID and log file through %n), so multi-node jobs
#   (`sbatch --nodes=2`, `srun` across both) really run. Each node offers the whole machine's CPUs and
#   memory: a test cluster, overcommitted on purpose, so single-node tests see the sizes they always saw.
#
# Environment knobs: BF_SLURM_STATE (PID/state dir), BF_SLURM_CLUSTER, BF_SLURM_PARTITION,
# BF_SLURM_TIMEOUT (seconds to wait for the node).
set -euo pipefail

STATE=${BF_SLURM_STATE:-/var/lib/brainfoundry-slurm}
CLUSTER=${BF_SLURM_CLUSTER:-bflocal}
PARTITION=${BF_SLURM_PARTITION:-debug}
TIMEOUT=${BF_SLURM_TIMEOUT:-120}
LOGDIR=/var/log/brainfoundry-slurm
CONF_DIR=/etc/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=brainfoundry-local
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client)
# Binaries that prove the packages are installed (fast path: no apt at all).
BINARIES=(slurmctld slurmd slurmdbd sbatch sacct sacctmgr sinfo scontrol munged mariadbd mariadb)
HOST=$(hostname -s)
NODES=("$HOST-1" "$HOST-2")
NODE_PORTS=(17001 17002)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-1 slurmd-2)

say() { echo "slurm_local: $*" >&2; }
die() { say "$*"; exit 1; }
cannot() { say "cannot run here: $*"; exit 2; }

pid_of() { [ -s "$STATE/$1.pid" ] && cat "$STATE/$1.pid" || true; }
alive() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

# record NAME PIDFILE: copy a daemon's own PID file into our state dir once it has written it.
record() {
  local name=$1 pidfile=$2
  wait_for 30 "$name pid file" test -s "$pidfile" || die "$name did not write $pidfile (see $LOGDIR)"
  cp "$pidfile" "$STATE/$name.pid"
  alive "$name" || die "$name exited right after start (see $LOGDIR/$name.log)"
}

have_binaries() {
  local b
  for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
  done
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null 2>&1 || cannot "the Slurm packages are missing and there is no apt-get"
  say "installing ${PACKAGES[*]} (once)"
  # Keep the packages' maintainer scripts from starting services themselves: we start them by hand.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  local ok=0
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$LOGDIR/apt.log" 2>&1; then
    ok=1
  elif apt-get update -q >>"$LOGDIR/apt.log" 2>&1 &&
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$LOGDIR/apt.log" 2>&1; then
    ok=1
  fi
  [ $created_policy = 1 ] && rm -f "$policy"
  [ $ok = 1 ] || cannot "apt-get could not install ${PACKAGES[*]} (see $LOGDIR/apt.log)"
  have_binaries || cannot "packages installed but binaries missing: ${BINARIES[*]}"
}

# write_if_changed PATH MODE: stdin to PATH when the content differs; returns 0 when it changed.
write_if_changed() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    return 1
  fi
  mv -f "$tmp" "$path"
  return 0
}

write_config() {
  local cpus mem_total real_mem changed=1
  cpus=$(nproc)
  mem_total=$(free -m | awk '/^Mem:/ {print $2}')
  # Stay under what the machine has, leaving room for the daemons and the test process.
  real_mem=$((mem_total * 80 / 100))
  mkdir -p "$CONF_DIR" /var/spool/slurmctld "$STATE/gpu"
  local n node_lines="" gres_lines=""
  for n in 0 1; do
    mkdir -p "/var/spool/slurmd/${NODES[n]}"
    : >"$STATE/gpu/${NODES[n]}-gpu0"
    : >"$STATE/gpu/${NODES[n]}-gpu1"
    node_lines+="NodeName=${NODES[n]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${NODE_PORTS[n]} CPUs=$cpus RealMemory=$real_mem Gres=gpu:2 State=UNKNOWN"$'\n'
    gres_lines+="NodeName=${NODES[n]} Name=gpu File=$STATE/gpu/${NODES[n]}-gpu0"$'\n'
    gres_lines+="NodeName=${NODES[n]} Name=gpu File=$STATE/gpu/${NODES[n]}-gpu1"$'\n'
  done
  write_if_changed "$CONF_DIR/slurm.conf" 644 <<EOF && changed=0
# Written by brainfoundry scripts/slurm_local.sh: a two-node test cluster on one host.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=/var/spool/slurmctld
# %n: the node name, so the two slurmd of this host keep apart.
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# Without a default every job would take the whole node's memory and jobs would run one at a time.
DefMemPerCPU=512
MinJobAge=600
KillWait=5
InactiveLimit=0
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStorageTRES=gres/gpu
# sacct shows the plugin's --comment (rule/group and wildcards of each job).
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
GresTypes=gpu
${node_lines}PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  write_if_changed "$CONF_DIR/gres.conf" 644 <<EOF && changed=0
# Two fake GPUs per node backed by empty files: enough for Slurm to schedule and account gres/gpu.
${gres_lines%$'\n'}
EOF
  write_if_changed "$CONF_DIR/slurmdbd.conf" 600 <<EOF && changed=0
# Written by brainfoundry scripts/slurm_local.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF
  return $changed
}

start_munge() {
  alive munged && return 0
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  rm -f /run/munge/munged.pid
  # munged refuses to run as root; it daemonizes and writes its own PID file.
  runuser -u munge -- /usr/sbin/munged >"$LOGDIR/munged.log" 2>&1 || die "munged failed (see $LOGDIR/munged.log)"
  record munged /run/munge/munged.pid
}

start_mariadb() {
  if ! alive mariadbd; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$LOGDIR/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed (see $LOGDIR/mariadb-install.log)"
    fi
    rm -f /run/mysqld/mariadbd.pid
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mariadbd.pid --bind-address=127.0.0.1 --skip-name-resolve \
      --innodb-buffer-pool-size=64M --log-error="$LOGDIR/mariadbd.log" </dev/null >/dev/null 2>&1 &
    record mariadbd /run/mysqld/mariadbd.pid
  fi
  wait_for 60 "mariadb socket" mariadb --protocol=socket -e "SELECT 1" || die "MariaDB did not answer (see $LOGDIR/mariadbd.log)"
  mariadb --protocol=socket <<EOF || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  alive slurmdbd && return 0
  rm -f /run/slurmdbd.pid
  slurmdbd >"$LOGDIR/slurmdbd.out" 2>&1 || die "slurmdbd failed (see $LOGDIR/slurmdbd.log)"
  record slurmdbd /run/slurmdbd.pid
  # slurmdbd creates its tables on first start; it accepts connections once that is done.
  wait_for 60 "slurmdbd" sacctmgr -n show cluster || die "slurmdbd did not answer (see $LOGDIR/slurmdbd.log)"
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  alive slurmctld && return 0
  rm -f /run/slurmctld.pid
  slurmctld >"$LOGDIR/slurmctld.out" 2>&1 || die "slurmctld failed (see $LOGDIR/slurmctld.log)"
  record slurmctld /run/slurmctld.pid
}

# start_slurmd INDEX: the slurmd of node NODES[INDEX] (daemon name slurmd-<INDEX+1>).
start_slurmd() {
  local node=${NODES[$1]} name=slurmd-$(($1 + 1))
  alive "$name" && return 0
  rm -f "/run/slurmd-$node.pid"
  slurmd -N "$node" >"$LOGDIR/slurmd-$node.out" 2>&1 || die "slurmd -N $node failed (see $LOGDIR/slurmd-$node.log)"
  record "$name" "/run/slurmd-$node.pid"
}

node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n1; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state node
  for node in "${NODES[@]}"; do
    while :; do
      state=$(node_state "$node")
      case "$state" in
        idle | mixed | allocated | completing) break ;;
        down* | drain* | *drain)
          # ReturnToService normally does this; a node left down by an earlier unclean stop needs a nudge.
          scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
      esac
      [ $SECONDS -lt $deadline ] || die "node $node not idle after ${TIMEOUT}s (state: ${state:-none}; see $LOGDIR)"
      sleep 0.5
    done
  done
}

all_alive() {
  local d
  for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
}

stop_one() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name ($pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$STATE/$name.pid"
}

# The single slurmd of this script's earlier, one-node layout (PID recorded as slurmd).
stop_legacy_slurmd() { stop_one slurmd; }

cmd_stop() {
  [ "$(id -u)" = 0 ] || cannot "stopping the local Slurm needs root"
  local i
  stop_legacy_slurmd
  # Reverse start order: compute daemons first, the database and munge last.
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
  say "stopped"
}

cmd_start() {
  [ "$(id -u)" = 0 ] || cannot "a local Slurm needs root (the daemons run as root/munge/mysql)"
  mkdir -p "$STATE" "$LOGDIR"
  install_packages
  if write_config; then
    # Daemons still running on the old configuration (the single-node one included) start again on this one.
    alive slurmctld && say "configuration changed; restarting the Slurm daemons"
    stop_legacy_slurmd
    stop_one slurmd-2
    stop_one slurmd-1
    stop_one slurmctld
    stop_one slurmdbd
  fi
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd 0
  start_slurmd 1
  wait_idle
  say "ready: cluster $CLUSTER, nodes ${NODES[*]} on $HOST ($(nproc) CPUs, 2 fake GPUs each), partition $PARTITION"
}

cmd_status() {
  local d rc=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then echo "$d running (pid $(pid_of "$d"))"; else echo "$d not running"; rc=1; fi
  done
  if [ $rc = 0 ]; then
    local node state
    for node in "${NODES[@]}"; do
      state=$(node_state "$node")
      echo "node $node: $state"
      [ -n "$state" ] || rc=1
    done
  fi
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart) cmd_stop; cmd_start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 64 ;;
esac
