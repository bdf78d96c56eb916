"""Replay synthetic routing at DeepSeek-V3 scale and measure the replay throughput.

Writes `results/comm/v3_replay.parquet` and its Markdown twin `v3_replay.md`: E=256, k=8 on
8 nodes x 8 GPUs ([V3] §3.2, §4.2), strategies uniform / unrestricted / device_limited /
node_limited (M=4, aux-loss-free bias trained on the same skewed logits), both dispatchers;
then uniform / unrestricted / node_limited with E=2048 (one expert per GPU, so a device
limit below k is infeasible) on 256 nodes x 8 = 2048 GPUs, the size of V3's cluster
([V3] §3.1). The throughput (token-layer routings per second) of the
fast per-token path (`token_stats`) and of the full accounting with per-GPU matrices
(`traffic`) is measured on a tiled node_limited routing, on `--threads` threads.

Usage: python benchmarks/comm_replay.py [--threads 2] [--out-dir results/comm]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from moebench.comm.accounting import expected_groups_uniform, token_stats, traffic
from moebench.comm.cli import write_replay
from moebench.comm.replay import (
    expert_popularity,
    replay_synthetic,
    strategy_config,
    synthetic_experts,
    train_bias,
)
from moebench.comm.topology import Topology
from moebench.io import write_json


def throughput(topo: Topology, num_tokens: int, threads: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` routings/s of token_stats and traffic on a node_limited routing
    (262,144 generated tokens tiled to `num_tokens`; tiling does not change per-token work)."""
    cfg = strategy_config("node_limited", topo.layout, 8, 4)
    popularity_E = expert_popularity(256, 0.25, 0)
    bias_E = train_bias(cfg, popularity_E, 20, 4096, 1e-3, 7)
    base = synthetic_experts("node_limited", 1 << 18, topo.layout, 8, 11, popularity_E, cfg, bias_E)
    experts_TK = np.tile(base, (max(1, num_tokens >> 18), 1))  # int16, as in traces
    out = {"tokens": float(len(experts_TK))}
    for name, fn in (("token_stats", token_stats), ("traffic", traffic)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn(experts_TK, topo, threads=threads)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_routings_per_s"] = len(experts_TK) / best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("results/comm"))
    parser.add_argument("--tokens-per-gpu", type=int, default=4096)
    parser.add_argument("--bias-steps", type=int, default=300)
    parser.add_argument("--throughput-tokens", type=int, default=1 << 23)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    v3 = Topology.v3()
    t0 = time.perf_counter()
    speed = throughput(v3, args.throughput_tokens, args.threads, args.repeats)
    print(f"throughput ({time.perf_counter() - t0:.0f} s): {speed}", flush=True)

    t0 = time.perf_counter()
    rows = replay_synthetic(
        v3, tokens_per_gpu=args.tokens_per_gpu, bias_steps=args.bias_steps, threads=args.threads
    )
    print(f"V3 replay: {time.perf_counter() - t0:.0f} s", flush=True)
    big = Topology.build(2048, 256, 8)
    t0 = time.perf_counter()
    rows += replay_synthetic(  # one expert per GPU: a device limit M < k cannot hold k experts
        big,
        ("uniform", "unrestricted", "node_limited"),
        tokens_per_gpu=128,
        bias_steps=args.bias_steps // 3,
        threads=args.threads,
    )
    print(f"2048-GPU replay: {time.perf_counter() - t0:.0f} s", flush=True)

    cores = len(os.sched_getaffinity(0))
    header = f"""# Communication replay at DeepSeek-V3 scale (`benchmarks/comm_replay.py`)

Synthetic routing, one MoE layer, replayed by `moebench.comm` (accounting conventions in
`src/moebench/comm/accounting.py`): tokens in contiguous blocks per source GPU, copies to
the own GPU free, per_expert = one copy per (token, expert), dedup = V3's one IB copy per
remote node then NVLink forwarding ([V3] §3.2.2). Bytes per token are dispatch (FP8, 1 B)
plus combine (BF16, 2 B) of hidden 7168; time = bandwidth-only model (NVLink 160 GB/s, IB
50 GB/s per GPU, busiest GPU and link) for {args.tokens_per_gpu} tokens per GPU on 8x8 and
128 on 256x8. Logits: N(0,1) + per-expert offset N(0, 0.25^2); node_limited bias: sign rule,
rate 1e-3, {args.bias_steps} updates (8x8) / {args.bias_steps // 3} (256x8) of 4096 tokens.
device_limited: [V2] rule (GPUs ranked by max score), M = 4 GPUs (8x8 only: with one
expert per GPU on 256x8, M < k is infeasible). Uniform analytic nodes
per token: {expected_groups_uniform(256, 8, 8):.4f} (E=256, 8 nodes, k=8),
{expected_groups_uniform(2048, 256, 8):.4f} (E=2048, 256 nodes).

Replay throughput, token-layer routings per second ({speed["tokens"]:.0f} tokens, V3
topology, {args.threads} threads on {cores} visible cores, {platform.machine()}, numpy
{np.__version__}, best of {args.repeats}):
per-token path (`token_stats`) {speed["token_stats_routings_per_s"] / 1e6:.1f} M/s, full
accounting with per-GPU matrices (`traffic`) {speed["traffic_routings_per_s"] / 1e6:.1f} M/s.

"""
    write_replay(rows, args.out_dir / "v3_replay.parquet", header)
    write_json(
        args.out_dir / "replay_throughput.json",
        {**speed, "threads": args.threads, "visible_cores": cores, "machine": platform.node()},
    )
    print((args.out_dir / "v3_replay.md").read_text())


if __name__ == "__main__":
    main()
