#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian slurm-wlm + munge), for tests and for trying the
# sbatch scripts in launch/slurm/ without a real cluster.
#
#   launch/local_cluster.sh start [CPUS]   install if missing, write config, start munged/slurmctld/slurmd
#   launch/local_cluster.sh stop           stop the daemons this script started, keep the config
#   launch/local_cluster.sh status         0 when the node is idle/ready
#   eval "$(launch/local_cluster.sh env)"  SLURM_CONF for sbatch/srun/squeue in this shell
#
# Idempotent: start on a running cluster only prints its env; stop on a stopped one is a no-op.
# Needs root (apt-get, daemons); everything it writes lives under $SEQPAR_SLURM_DIR
# (default /tmp/seqpar-slurm), plus one "127.0.0.1 <hostname>" line in /etc/hosts if the host name
# does not resolve. CPUS (default 4) may exceed the cores: slurmd then runs with config_overrides.
set -euo pipefail

DIR=${SEQPAR_SLURM_DIR:-/tmp/seqpar-slurm}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
CPUS=${2:-${SEQPAR_SLURM_CPUS:-4}}

log() { echo "local_cluster: $*" >&2; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { log "slurm is not installed and apt-get is unavailable"; exit 3; }
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  }
}

write_config() {
  mkdir -p "$DIR"/{state,spool,log,run}
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
  cat > "$CONF" <<EOF
# written by seqpar launch/local_cluster.sh: one node, everything under $DIR
ClusterName=seqpar-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
KillWait=5
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SEQPAR_SLURMCTLD_PORT:-16817}
SlurmdPort=${SEQPAR_SLURMD_PORT:-16818}
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  [ -f /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key
  chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do
    # recorded here only when this script started it, so stop leaves a munged it did not start alone
    if munge -n </dev/null >/dev/null 2>&1; then cp /run/munge/munged.pid "$DIR/run/munged.pid"; return 0; fi
    sleep 0.1
  done
  log "munged did not come up"; exit 1
}

node_ready() {
  local s
  s=$(SLURM_CONF=$CONF sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1) || return 1
  [[ "$s" == idle* || "$s" == mix* || "$s" == alloc* ]]
}

start() {
  if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && node_ready; then
    log "already running"; env_lines; return 0
  fi
  install
  write_config
  start_munge
  alive "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF"
  alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
  for _ in $(seq 150); do
    if node_ready; then log "node $HOST ready ($CPUS CPUs)"; env_lines; return 0; fi
    SLURM_CONF=$CONF scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  log "node did not become idle; see $DIR/log"; tail -n 20 "$DIR"/log/*.log >&2 || true; exit 1
}

stop_pid() {
  local f=$1 pid
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f"); kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$f"
}

stop() {
  [ -f "$CONF" ] && SLURM_CONF=$CONF scancel --quiet -u root 2>/dev/null || true
  stop_pid "$DIR/run/slurmd.pid"
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$DIR/run/munged.pid"
  log "stopped"
}

env_lines() { echo "export SLURM_CONF=$CONF"; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) alive "$DIR/run/slurmctld.pid" && node_ready ;;
  env) env_lines ;;
  *) echo "usage: $0 start [CPUS] | stop | status | env" >&2; exit 2 ;;
esac
