"""Time the real expert-parallel all-to-all (`moebench.comm.ep_moe`) per phase and check that
the bytes it moves equal the accounting of the same routing.

One process per rank: NCCL with one GPU each when `--backend nccl`, else gloo on CPU. Each
rank routes its own `--tokens` tokens (top-k of random logits) over `--nodes` x
`--gpus-per-node` ranks (ranks are grouped into nodes only for the NVLink / IB split).

Usage: python benchmarks/comm_a2a.py --backend gloo --nodes 2 --gpus-per-node 2
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebench.comm import Topology, ep_moe, summarize, traffic
from moebench.routing import Layout, preset, route


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = args.nodes * args.gpus_per_node
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    layout = Layout.contiguous(args.experts, args.nodes, args.gpus_per_node)
    cfg = preset("v3", num_experts=args.experts, top_k=args.top_k, num_groups=1)
    gen = torch.Generator().manual_seed(0)
    T = args.tokens
    experts_all = route(torch.randn(world * T, args.experts, generator=gen), cfg).experts
    rows = slice(rank * T, (rank + 1) * T)
    x = torch.randn(T, args.hidden, generator=gen).to(device, torch.bfloat16)
    experts, weights = experts_all[rows].to(device), torch.rand(T, args.top_k).to(device)
    fns = {e: (lambda h: h * 2) for e in range(args.experts)}
    for _ in range(args.warmup):
        ep_moe(x, experts, weights, layout, fns)
    _, plan = ep_moe(x, experts, weights, layout, fns)
    sent = torch.tensor(
        [plan.link_bytes[p][k] for p in ("dispatch", "combine") for k in ("nvlink", "ib")],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(sent)
    if rank == 0:
        topo = Topology(layout, hidden=args.hidden, dispatch_bytes=2, combine_bytes=2)
        tr = traffic(experts_all, topo)
        row = next(
            r for r in summarize(tr.token_stats(topo), topo, tr) if r["dispatcher"] == "per_expert"
        )
        expected = [
            row[f"{k}_{p}_bytes_per_token"] * world * T
            for p in ("dispatch", "combine")
            for k in ("nvlink", "ib")
        ]
        print(f"backend {args.backend}, {world} ranks, {T} tokens/rank, hidden {args.hidden}")
        print("phase times (ms):", {k: round(v * 1e3, 3) for k, v in plan.timings_s.items()})
        print("bytes moved (dispatch nvlink, ib, combine nvlink, ib):", sent.tolist())
        print("bytes accounted:", expected, "equal:", sent.tolist() == expected)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.nodes * args.gpus_per_node, join=True)


if __name__ == "__main__":
    main()
