"""Does a fitted expert placement's modelled gain show in the measured time of the real
expert-parallel layer (issue 19, item 3)?

One process per rank (NCCL with one GPU each, or gloo on CPU). Every rank routes its own
`--tokens` tokens top-k over E experts drawn from a skewed popularity p_e ~ (e + 1)^-skew,
so the popular experts sit together in the contiguous layout's first rank. The placement
rule (`--rule`, default our local search; R = 0, since a `Layout` holds one copy of each
expert) is fitted on other tokens of the same popularity and judged on the timed ones. For
the contiguous and the fitted layout, the routed experts (`RoutedExperts` sharded by
`ExpertParallel`, the training code's layer) run forward + backward `--iters` times; the
step time is the slowest rank's (a barrier starts each iteration). Also checked per layout:
the bytes the forward's all-to-alls moved equal the accounting of the same routing on the
same placement (`moebench.comm.accounting`, per-expert dispatcher: one row per token and
expert on another rank, as the layer sends).

Writes one JSON line per layout to `--output`: rule, modelled busiest/mean rank load, measured
ms per step (median and 20/80% quantiles over iterations), and measured / modelled bytes;
then the ratio fitted / contiguous of both, measured in the same run.

Usage: python benchmarks/ep_placement.py --backend nccl --world 2 --output $OUT/ep_placement.jsonl
       python benchmarks/ep_placement.py --backend gloo --world 2 --tokens 512 --output /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebench.comm.accounting import summarize, traffic
from moebench.comm.alltoall import LINKS, PHASES, A2AStats, PhaseTimer
from moebench.comm.placement import Placement, contiguous, fit, judge
from moebench.model.moe import ExpertParallel, RoutedExperts


def skewed_routing(tokens: int, experts: int, top_k: int, skew: float, seed: int) -> torch.Tensor:
    """int64 [T, K]: K distinct experts per token, drawn without replacement from
    p_e ~ (e + 1)^-skew (Gumbel top-k)."""
    gen = torch.Generator().manual_seed(seed)
    log_p_E = -skew * torch.log(torch.arange(1, experts + 1, dtype=torch.float64))
    gumbel_TE = -torch.log(-torch.log(torch.rand(tokens, experts, generator=gen,
                                                 dtype=torch.float64)))
    return (log_p_E + gumbel_TE).topk(top_k, dim=1).indices


def time_layer(args: argparse.Namespace, ep: ExpertParallel, routing_TK: torch.Tensor,
               device: torch.device) -> tuple[list[float], list[float], A2AStats]:
    """ms per forward + backward of the routed experts sharded by `ep` and ms of the
    forward's dispatch + combine (slowest rank, each iteration), and the last forward's
    all-to-all statistics."""
    torch.manual_seed(0)  # the same expert weights for every layout
    layer = RoutedExperts(args.experts, args.hidden, args.ffn)
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        torch.nn.init.normal_(w, std=w.shape[1] ** -0.5)
    layer = layer.to(device)
    layer.shard(ep)
    T, K = args.tokens, args.top_k
    rows = slice(ep.rank * T, (ep.rank + 1) * T)
    gen = torch.Generator().manual_seed(1 + ep.rank)
    x_TH = torch.randn(T, args.hidden, generator=gen).to(device, args.dtype)
    gates_TK = torch.rand(T, K, generator=gen).to(device)
    experts_TK = routing_TK[rows].to(device)
    keep_TK = torch.ones(T, K, dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, a2a_times = [], []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        sync()
        timer = PhaseTimer(device)
        start = time.perf_counter()
        y_TH, stats = layer(x_TH, experts_TK, gates_TK, keep_TK, timer)
        y_TH.float().square().mean().backward()
        sync()
        elapsed = time.perf_counter() - start
        a2a = sum(timer.seconds()[phase] for phase in PHASES)
        slowest = torch.tensor([elapsed, a2a], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if i >= args.warmup:
            times.append(float(slowest[0]) * 1e3)
            a2a_times.append(float(slowest[1]) * 1e3)
    return times, a2a_times, stats


def bytes_sent(link_bytes: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Bytes all ranks sent per phase and link class, from each rank's `link_bytes` (an
    `A2AStats` property: useful or moved bytes; collective)."""
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    sent = torch.tensor([[link_bytes[p][link] for link in LINKS] for p in PHASES],
                        dtype=torch.int64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(sent)
    return {p: dict(zip(LINKS, sent[i].tolist(), strict=True)) for i, p in enumerate(PHASES)}


def accounted_bytes(placement: Placement, routing_TK: torch.Tensor, **topo: float) -> float:
    """Dispatch + combine bytes of the per-expert dispatcher for this routing and placement
    (token t starts on rank t // tokens-per-rank, as the ranks' rows are taken)."""
    topology = placement.topology(**topo)
    tr = traffic(placement.assign(routing_TK.numpy()), topology, threads=1)
    row = next(r for r in summarize(tr.token_stats(topology), topology, tr)
               if r["dispatcher"] == "per_expert")
    return (row["nvlink_bytes_per_token"] + row["ib_bytes_per_token"]) * len(routing_TK)


def join(rank: int, args: argparse.Namespace, port: int) -> torch.device:
    """Join the process group as `rank`; returns this rank's device (one GPU per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)
    return device


def write_rows(args: argparse.Namespace, device: torch.device, keys: tuple[str, ...],
               rows: list[dict]) -> None:
    """Write `rows` to `args.output` as JSON lines (and print them), each with the setting."""
    setting = {k: getattr(args, k) for k in keys}
    setting["dtype"] = str(args.dtype).removeprefix("torch.")
    setting["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with Path(args.output).open("w") as f:
        for row in rows:
            line = json.dumps(setting | row)
            f.write(line + "\n")
            print(line, flush=True)


def layer_parser(description: str) -> argparse.ArgumentParser:
    """The options every expert-parallel layer benchmark takes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=1024, help="expert width")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--output", required=True, help="JSON lines file")
    return ap


def launch(worker: Callable[[int, argparse.Namespace, int], None],
           args: argparse.Namespace) -> None:
    """Run `worker(rank, args, port)` on `args.world` processes (bf16 on NCCL, else fp32)."""
    args.dtype = torch.bfloat16 if args.backend == "nccl" else torch.float32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world)


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    device = join(rank, args, port)
    E, W, K = args.experts, args.world, args.top_k
    timed_TK = skewed_routing(W * args.tokens, E, K, args.skew, seed=0)
    fit_TK = skewed_routing(W * args.tokens, E, K, args.skew, seed=1)
    row_bytes = args.hidden * torch.finfo(args.dtype).bits // 8
    topo = {"hidden": args.hidden, "dispatch_bytes": row_bytes / args.hidden,
            "combine_bytes": row_bytes / args.hidden}
    placements = {"contiguous": contiguous(E, 1, W),
                  args.rule: fit(args.rule, fit_TK.numpy(), E, 1, W, **topo)}
    results = {}
    for name, placement in placements.items():
        ep = ExpertParallel(placement.layout(), rank, args.world)
        times, _, stats = time_layer(args, ep, timed_TK, device)
        sent = sum(sum(links.values()) for links in bytes_sent(stats.link_bytes).values())
        modelled = judge(placement, timed_TK.numpy(), **topo)
        q20, q50, q80 = np.quantile(times, [0.2, 0.5, 0.8])
        results[name] = {
            "layout": name,
            "busiest_over_mean_modelled": modelled["busiest_over_mean"],
            "ms_median": q50, "ms_p20": q20, "ms_p80": q80,
            "bytes_measured": sent,
            "bytes_accounted": accounted_bytes(placement, timed_TK, **topo),
        }
    if rank == 0:
        base, best = results["contiguous"], results[args.rule]
        ratio = {
            "layout": f"{args.rule} / contiguous",
            "busiest_over_mean_modelled": best["busiest_over_mean_modelled"]
            / base["busiest_over_mean_modelled"],
            "ms_median": best["ms_median"] / base["ms_median"],
        }
        write_rows(args, device, ("backend", "world", "experts", "top_k", "tokens", "hidden",
                                  "ffn", "skew"), [*results.values(), ratio])
    dist.destroy_process_group()


def main() -> None:
    ap = layer_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--rule", choices=("eplb", "search"), default="search")
    launch(_worker, ap.parse_args())


if __name__ == "__main__":
    main()
