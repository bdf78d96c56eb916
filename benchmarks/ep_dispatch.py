"""Does the deduplicated dispatcher's modelled saving show in the real expert-parallel layer,
and does node-limited routing's (issue 14, item 5)? What does the padded, sync-free
per_expert all-to-all cost or save against the exact one (issue 14, item 2)?

One process per rank (NCCL with one GPU each, or gloo on CPU). The `--world` ranks are
taken as two real topologies: "Wx1", each rank its own node, and "1xW", one node of W
ranks (`ExpertParallel.rank_layout` of a modelled layout of that shape). Every rank routes
its own `--tokens` tokens (random logits, the V3 router over E experts, top-k) either
plainly ("none") or group-limited to M = 1 of W groups ("limited": each token's experts on
one rank, so node-limited under Wx1). The dispatchers: "per_expert", "dedup" and
"per_expert_padded" (per_expert with `--a2a-capacity-factor`, default W: nothing dropped;
no host sync). For each (topology, routing, dispatcher), the routed
experts (`RoutedExperts` sharded by `ExpertParallel`, the training code's layer) run
forward + backward `--iters` times (`ep_placement.time_layer`: slowest rank, a barrier
before each iteration). Per case, the bytes the forward's all-to-alls sent (all ranks, per
phase and link class) are written beside the accounting of the same routing on the same
ranks (`moebench.comm.accounting`, same dispatcher; padded: per_expert's useful rows, with
the bytes really moved, padding included, and the assignments dropped beside them).

Writes one JSON line per case to `--output` (ms per step and ms of the forward's dispatch +
combine: median and 20/80% quantiles; measured and accounted bytes), then the ratios
measured in the same run: dedup / per_expert and per_expert_padded / per_expert per
(topology, routing), and limited / none per (topology, dispatcher).

Usage: python benchmarks/ep_dispatch.py --backend nccl --world 2 --output $OUT/ep_dispatch.jsonl
       python benchmarks/ep_dispatch.py --backend gloo --world 2 --tokens 256 --output /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ep_placement import bytes_sent, join, launch, layer_parser, time_layer, write_rows

from moebench.comm import DISPATCHERS, Topology, token_stats
from moebench.comm.alltoall import LINKS, PHASES, A2AStats
from moebench.model.moe import ExpertParallel
from moebench.routing import Layout, preset, route

ROUTINGS = ("none", "limited")
PADDED = "per_expert_padded"
VARIANTS = {name: name for name in DISPATCHERS} | {PADDED: "per_expert"}
"""The dispatchers timed, by name: the `ExpertParallel.dispatcher` each runs."""


def routing(args: argparse.Namespace, limited: bool) -> torch.Tensor:
    """int64 [W T, K]: every rank's tokens routed by the V3 router on random logits (the
    same on every rank), top-k of all experts or of M = 1 of W expert groups."""
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(args.world * args.tokens, args.experts, generator=gen)
    cfg = preset("v3", num_experts=args.experts, top_k=args.top_k, num_groups=args.world,
                 group_limit=1 if limited else args.world)
    return route(logits_TE, cfg).experts


def accounted(ep: ExpertParallel, routing_TK: torch.Tensor, row_bytes: int
              ) -> dict[str, dict[str, int]]:
    """Bytes per phase and link class that the accounting predicts for `ep`'s dispatcher
    on the real ranks (token t starts on rank t // tokens-per-rank)."""
    topo = Topology(ep.rank_layout, hidden=1, dispatch_bytes=row_bytes,
                    combine_bytes=row_bytes)
    copies = token_stats(routing_TK, topo, threads=1).copies[ep.dispatcher]
    return {p: {link: round(copies[link] * topo.bytes_per_copy(p)) for link in LINKS}
            for p in PHASES}


def ratios(results: dict[tuple[str, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """dedup and per_expert_padded / per_expert per (topology, routing) and limited / none
    per (topology, dispatcher): step and all-to-all ms (medians), total and IB useful bytes
    measured."""
    rows = []
    pairs = [((t, r, d), (t, r, "per_expert"), {"topology": t, "routing": r,
              "dispatcher": f"{d} / per_expert"}) for t, r, d in results if d != "per_expert"]
    pairs += [((t, "limited", d), (t, "none", d), {"topology": t, "routing": "limited / none",
               "dispatcher": d}) for t, r, d in results if r == "none"]
    for num, den, row in pairs:
        a, b = results[num], results[den]
        total = [sum(sum(links.values()) for links in x["bytes_measured"].values())
                 for x in (a, b)]
        ib = [sum(links["ib"] for links in x["bytes_measured"].values()) for x in (a, b)]
        rows.append(row | {
            "ms_median": a["ms_median"] / b["ms_median"],
            "a2a_ms_median": a["a2a_ms_median"] / b["a2a_ms_median"],
            "bytes": total[0] / total[1],
            "ib_bytes": ib[0] / ib[1] if ib[1] else None,
        })
    return rows


def dropped(stats: A2AStats) -> int:
    """Assignments the padded all-to-all dropped on all ranks (collective)."""
    assert stats.dropped is not None
    total = stats.dropped.clone()
    dist.all_reduce(total)
    return int(total)


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    device = join(rank, args, port)
    W = args.world
    row_bytes = args.hidden * torch.finfo(args.dtype).bits // 8
    topologies = {f"{W}x1": Layout.contiguous(args.experts, W, 1),
                  f"1x{W}": Layout.contiguous(args.experts, 1, W)}
    routings = {name: routing(args, name == "limited") for name in ROUTINGS}
    results = {}
    for topo_name, layout in topologies.items():
        for routing_name, routing_TK in routings.items():
            for name, dispatcher in VARIANTS.items():
                cf = (args.a2a_capacity_factor or W) if name == PADDED else None
                ep = ExpertParallel(layout, rank, W, dispatcher=dispatcher,
                                    a2a_capacity_factor=cf)
                times, a2a_times, stats = time_layer(args, ep, routing_TK, device)
                (q20, q50, q80), (a20, a50, a80) = (np.quantile(t, [0.2, 0.5, 0.8])
                                                    for t in (times, a2a_times))
                results[topo_name, routing_name, name] = {
                    "topology": topo_name, "routing": routing_name, "dispatcher": name,
                    "ms_median": q50, "ms_p20": q20, "ms_p80": q80,
                    "a2a_ms_median": a50, "a2a_ms_p20": a20, "a2a_ms_p80": a80,
                    "bytes_measured": bytes_sent(stats.link_bytes),
                    "bytes_accounted": accounted(ep, routing_TK, row_bytes),
                } | ({} if cf is None else {
                    "a2a_capacity_factor": cf,
                    "bytes_moved": bytes_sent(stats.moved_link_bytes),
                    "a2a_dropped": dropped(stats),
                })
    if rank == 0:
        write_rows(args, device, ("backend", "world", "experts", "top_k", "tokens", "hidden",
                                  "ffn"), [*results.values(), *ratios(results)])
    dist.destroy_process_group()


def main() -> None:
    ap = layer_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--a2a-capacity-factor", type=float, default=None,
                    help="of per_expert_padded (default: the world size, nothing dropped)")
    launch(_worker, ap.parse_args())


if __name__ == "__main__":
    main()
