# Shared by the test clusters' scripts (sourced): slurm-wlm + munge from apt if missing, and
# munged (its key and socket are shared by both test clusters; it is left running).
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
