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
from moebench.comm.alltoall import A2AStats, AllToAll, PhaseTimer, Splits, exchange_counts
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
    "A2AStats",
    "AllToAll",
    "PhaseTimer",
    "Splits",
    "TokenStats",
    "Topology",
    "Trace",
    "Traffic",
    "comm_summary",
    "exchange_counts",
    "expected_groups_uniform",
    "gpu_time_s",
    "read_trace",
    "replay_layers",
    "replay_synthetic",
    "summarize",
    "token_stats",
    "traffic",
]
