#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py) and for
# trying `launcher=slurm` without an HPC account. Debian/Ubuntu, as root (CI containers); no systemd needed.
#
#   scripts/slurm-local.sh start    install slurm-wlm + munge if missing, write the config, start munged,
#                                   slurmctld and slurmd, wait until `sinfo` shows the node idle (idempotent)
#   scripts/slurm-local.sh stop     stop the three daemons this script started
#   scripts/slurm-local.sh status   `sinfo` and `squeue`, exit 1 when the scheduler does not answer
#
# The node: this machine's hostname, CPUs=$(nproc), RealMemory = 90% of MemTotal (MB); one partition `debug`
# (default, no time limit). No cgroups (proctrack/linuxproc, task/none), select/cons_tres with CPUs as the only
# consumable (memory requests are checked against RealMemory, not enforced). Requeued jobs start again after
# 20 s (cred_expire; Slurm's default is 120 s); a killed or requeued job gets SIGKILL 1 s after SIGTERM (KillWait; default
# 30 s: submitit ignores SIGTERM, so a requeued job would otherwise run on). No accounting daemon: `sacct` answers nothing and submitit tracks
# jobs by their result files. State, logs and pid files: $SLURM_LOCAL_DIR
# (default /var/spool/histolight-slurm); the config: /etc/slurm/slurm.conf (Debian's default path).
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/var/spool/histolight-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

die() { echo "slurm-local: $*" >&2; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
  echo "slurm-local: installing slurm-wlm and munge" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$STATE/ctld" "$STATE/d" "$(dirname "$CONF")"
  cat >"$CONF.tmp" <<EOF
# written by histolight scripts/slurm-local.sh: a single-node test cluster
ClusterName=histolight
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
# step credentials live 20 s (default 120): a requeued job may start again after that long
AuthInfo=cred_expire=20
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=1
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  touch "$STATE/munged.ours"
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.5; done
  die "munged does not answer (munge -n | unmunge fails); see /var/log/munge/munged.log"
}

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1; }

start() {
  install_packages
  if ! alive "$STATE/slurmctld.pid" || ! alive "$STATE/slurmd.pid"; then
    stop_daemons
    write_config
    mkdir -p "$STATE"
    start_munge
    slurmctld -c  # -c: a fresh cluster (no jobs left over from an earlier session)
    slurmd
  fi
  local t0=$SECONDS state=""
  while [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do
    state=$(node_state)
    case "$state" in
      idle | mix | alloc) echo "slurm-local: node $NODE is $state"; sinfo; return ;;
      drain* | down* | drng*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "slurm-local: node $NODE is not idle after ${WAIT_S}s (state: ${state:-no answer}); last log lines:" >&2
  tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  exit 1
}

stop_daemons() {
  local name pidfile pid
  for name in slurmd slurmctld; do
    pidfile=$STATE/$name.pid
    if alive "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
  done
}

stop() {
  stop_daemons
  # munged is stopped only when this script started it (a system munged is left alone)
  if [ -f "$STATE/munged.ours" ] && alive /run/munge/munged.pid; then
    kill "$(cat /run/munge/munged.pid)"
  fi
  rm -f "$STATE/munged.ours"
  echo "slurm-local: stopped"
}

status() {
  sinfo && squeue
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 {start|stop|status}" ;;
esac
