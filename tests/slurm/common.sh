# Shared by the test clusters' scripts (sourced): slurm-wlm + munge from apt if missing,
# munged (its key and socket are shared by both test clusters; it is left running), and
# the part of slurm.conf both clusters have in common.
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons (slurmctld, slurmd, munged), from any PATH

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
  [[ -f /etc/munge/munge.key ]] || mungekey -c
  mkdir -p /run/munge && chown munge:munge /run/munge
  munge -n >/dev/null 2>&1 && return
  su -s /bin/sh munge -c munged
  for _ in $(seq 20); do munge -n >/dev/null 2>&1 && return; sleep 0.5; done
  echo "munged did not start" >&2; exit 1
}

# slurm.conf of a test cluster: the settings both clusters share (root daemons, munge, the
# controller's state, pid and log under $1, no cgroups or accounting, cores and memory as
# consumable resources), then the cluster's own lines from stdin (name, ports, slurmd
# files, nodes and partition).
slurm_conf() {
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$1/state
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
CONF
  cat
}

# $1 percent of this machine's memory in MiB (a node's RealMemory).
memory_mib() {
  echo $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * $1 / 100 ))
}
