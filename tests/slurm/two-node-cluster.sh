#!/bin/bash
# Start (or stop) a two-node SLURM cluster on this machine, for multi-node tests
# (tests/test_slurm_two_nodes.py): slurmctld on the host, and two slurmd, node1 and node2,
# each in its own network and UTS namespace: a host of its own, with its address, hostname,
# spool and log. Munge is the host's (its socket is a file, seen from every namespace).
#   two-node-cluster.sh start        install slurm-wlm + munge if missing, build the network,
#                                    write $STATE/etc/slurm.conf, start the daemons
#   two-node-cluster.sh stop         stop the daemons; remove the namespaces, links, files
#   two-node-cluster.sh status       sinfo
#   two-node-cluster.sh crash NODE   a node failure: SIGKILL every process of NODE (its
#                                    slurmd, job steps and tasks)
#   two-node-cluster.sh boot NODE    start NODE's slurmd again (it returns to service)
# Networks (private 10.231.0.0/16):
#   management: bridge mbn-br 10.231.0.1/24 on the host, node<i>:eth0 10.231.0.1<i>; the
#     SLURM traffic (NodeAddr, the controller at 10.231.0.1:6827)
#   data, "the link": one veth pair, node1:ib0 10.231.1.1 <-> node2:ib0 10.231.1.2. Inside
#     the nodes (/etc/netns/<ns>/hosts), the controller's host name resolves to 10.231.0.1,
#     and node1 and node2 to their data addresses, so the
#     rendezvous (MASTER_ADDR=node1) and gloo cross it, and its counters
#     (ib0 in /proc/net/dev, read in a node) count every byte between the two nodes.
# Clients on the host use the cluster by SLURM_CONF=$STATE/etc/slurm.conf (inside the nodes
# it is /etc/slurm/slurm.conf; the one-node cluster of local-cluster.sh keeps the host's
# /etc/slurm/slurm.conf and port 6817; both can run at once).
set -euo pipefail
source "$(dirname "$0")/common.sh"
STATE=${SLURM_TWO_NODE_STATE:-/var/tmp/moebench-slurm2}
CONF=$STATE/etc/slurm.conf
NODES=(node1 node2)
cmd=${1:-start}

ns() { echo "moebench-$1"; }

check_namespaces() {
  local err
  if ! err=$(ip netns add moebench-probe 2>&1); then
    echo "network namespaces are not permitted here (ip netns add: $err); the two-node" \
         "SLURM cluster needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN" >&2
    exit 1
  fi
  ip netns del moebench-probe
}

build_network() {
  local i node
  ip link add mbn-br type bridge
  ip addr add 10.231.0.1/24 dev mbn-br
  ip link set mbn-br up
  for i in 1 2; do
    node=${NODES[i - 1]}
    ip netns add "$(ns "$node")"
    ip -n "$(ns "$node")" link set lo up
    ip link add "mbn-h$i" type veth peer name eth0 netns "$(ns "$node")"
    ip link set "mbn-h$i" master mbn-br up
    ip -n "$(ns "$node")" addr add "10.231.0.1$i/24" dev eth0
    ip -n "$(ns "$node")" link set eth0 up
    ip netns exec "$(ns "$node")" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    mkdir -p "/etc/netns/$(ns "$node")"
    printf '127.0.0.1 localhost\n10.231.0.1 %s\n10.231.1.1 node1\n10.231.1.2 node2\n' \
      "$(hostname -s)" >"/etc/netns/$(ns "$node")/hosts"
  done
  ip link add ib0 netns "$(ns node1)" type veth peer name ib0 netns "$(ns node2)"
  for i in 1 2; do
    ip -n "$(ns "${NODES[i - 1]}")" addr add "10.231.1.$i/24" dev ib0
    ip -n "$(ns "${NODES[i - 1]}")" link set ib0 up
  done
}

write_conf() {
  local mem
  mem=$(memory_mib 40)
  mkdir -p "$STATE"/{etc,state,spool,log}
  slurm_conf "$STATE" >"$CONF" <<CONF
ClusterName=moebench-two
SlurmctldHost=$(hostname -s)(10.231.0.1)
SlurmctldPort=6827
SlurmdPort=6828
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
# a node that stops answering is DOWN after 10 s, its job is killed (its step 3 s after the
# signal) and fails (NODE_FAIL) instead of waiting in the queue for the node to return
SlurmdTimeout=10
KillWait=3
JobRequeue=0
NodeName=node1 NodeAddr=10.231.0.11 CPUs=2 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=10.231.0.12 CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
}

boot() {  # slurmd of node $1 in its namespaces: its network, hostname, /etc/hosts and
  # /etc/slurm (so that clients in jobs, srun in a batch script, find this cluster's config
  # at the default path, as on a real node); `nsenter`, not `ip netns exec`, which mounts a
  # /sys without the cgroup tree slurmd reads
  mkdir -p "$STATE/spool/$1" /etc/slurm
  nsenter --net="/var/run/netns/$(ns "$1")" unshare --mount --uts sh -c "hostname $1 &&
    mount --bind /etc/netns/$(ns "$1")/hosts /etc/hosts &&
    mount --bind $STATE/etc /etc/slurm && exec slurmd"
}

up() {
  SLURM_CONF=$CONF sinfo -h -o '%n %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$' || true
}

start() {
  install
  check_namespaces
  [[ -e /var/run/netns/$(ns node1) ]] || build_network
  write_conf
  start_munge
  pgrep -F "$STATE/slurmctld.pid" >/dev/null 2>&1 || slurmctld -f "$CONF"
  sleep 1
  for node in "${NODES[@]}"; do
    pgrep -F "$STATE/slurmd-$node.pid" >/dev/null 2>&1 || boot "$node"
  done
  for _ in $(seq 60); do
    if [[ $(up) == 2 ]]; then SLURM_CONF=$CONF sinfo; return; fi
    sleep 1
  done
  echo "the nodes never became idle; logs in $STATE/log" >&2; exit 1
}

crash() {
  local pids
  pids=$(ip netns pids "$(ns "$1")")
  if [[ -n $pids ]]; then kill -9 $pids; fi
}

stop() {
  local pid node
  for node in "${NODES[@]}"; do
    if [[ -e /var/run/netns/$(ns "$node") ]]; then crash "$node"; fi
  done
  if [[ -f $STATE/slurmctld.pid ]] && pid=$(cat "$STATE/slurmctld.pid") && kill "$pid" 2>/dev/null; then
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  for node in "${NODES[@]}"; do
    ip netns del "$(ns "$node")" 2>/dev/null || true
    ip link del "mbn-h${node#node}" 2>/dev/null || true
    rm -rf "/etc/netns/$(ns "$node")"
  done
  ip link del mbn-br 2>/dev/null || true
  rm -rf "$STATE"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo ;;
  crash) crash "${2:?node}" ;;
  boot) boot "${2:?node}" ;;
  *) echo "usage: $0 start|stop|status|crash NODE|boot NODE" >&2; exit 2 ;;
esac
