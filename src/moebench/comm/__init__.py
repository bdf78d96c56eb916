"""Communication profiling of MoE routing: topology, accounting (GPUs and nodes per token,
NVLink and InfiniBand bytes, per-GPU matrices, modeled all-to-all time), trace replay at
cluster scale, and a real expert-parallel all-to-all over torch.distributed."""

from moebench.comm.accounting import (
    DISPATCHERS,
    TokenStats,
    Traffic,
    expected_groups_uniform,
    gpu_time_s,
    summarize,
    token_stats,
    traffic,
)
from moebench.comm.alltoall import AllToAll, DispatchPlan, combine, dispatch, ep_moe, run_experts
from moebench.comm.replay import (
    STRATEGIES,
    Trace,
    comm_summary,
    read_trace,
    replay_layers,
    replay_synthetic,
)
from moebench.comm.topology import Topology

__all__ = [
    "DISPATCHERS",
    "STRATEGIES",
    "AllToAll",
    "DispatchPlan",
    "TokenStats",
    "Topology",
    "Trace",
    "Traffic",
    "combine",
    "comm_summary",
    "dispatch",
    "ep_moe",
    "expected_groups_uniform",
    "gpu_time_s",
    "read_trace",
    "replay_layers",
    "replay_synthetic",
    "run_experts",
    "summarize",
    "token_stats",
    "traffic",
]
