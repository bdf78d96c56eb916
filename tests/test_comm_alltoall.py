"""Real expert-parallel MoE layer on gloo processes: the bytes moved equal the accounting
of the same routing on the ranks' layout, and the layer equals the single-process formula,
forward and backward, with the modelled topology equal to the world (4 ranks = 2 nodes x 2
GPUs) and decoupled from it (2 ranks, each holding one modelled node of 2 GPUs). Some
assignments are dropped (capacity): they are never sent.

Legend: W ranks, E experts, K experts per token, T tokens, H hidden, F expert hidden.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from local_servers import free_port
from moebench.comm import Topology, summarize, traffic
from moebench.model import ExpertParallel, RoutedExperts
from moebench.routing import Layout, preset, route

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # spawned processes: ~20 s

NODES, GPUS, E, K, T_TOTAL, H, FFN = 2, 2, 8, 3, 48, 16, 8


def _problem() -> dict[str, torch.Tensor]:
    """The same global batch, routing, drops and expert weights on every rank (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T_TOTAL, H, generator=gen, dtype=torch.float64)
    r = route(torch.randn(T_TOTAL, E, generator=gen),
              preset("v3", num_experts=E, top_k=K, num_groups=1))
    keep = torch.rand(T_TOTAL, K, generator=gen) > 0.2
    return {
        "x": x,
        "experts": r.experts,
        "keep": keep,
        "gates": r.weights.double() * keep,
        "w_gate": torch.randn(E, H, FFN, generator=gen, dtype=torch.float64) / H**0.5,
        "w_up": torch.randn(E, H, FFN, generator=gen, dtype=torch.float64) / H**0.5,
        "w_down": torch.randn(E, FFN, H, generator=gen, dtype=torch.float64) / FFN**0.5,
        "grad_out": torch.randn(T_TOTAL, H, generator=gen, dtype=torch.float64),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        p = _problem()
        ep = ExpertParallel(Layout.contiguous(E, NODES, GPUS), rank, world)
        experts = RoutedExperts(E, H, FFN).double()
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(experts, name).copy_(p[name])
        experts.shard(ep)
        n = T_TOTAL // world
        rows = slice(rank * n, (rank + 1) * n)
        x = p["x"][rows].clone().requires_grad_()
        gates = p["gates"][rows].clone().requires_grad_()
        out, stats = experts(x, p["experts"][rows], gates, p["keep"][rows])
        (out * p["grad_out"][rows]).sum().backward()
        torch.save(
            {
                "out": out.detach(),
                "grad_x": x.grad,
                "grad_gates": gates.grad,
                "grads": {k: getattr(experts, k).grad for k in ("w_gate", "w_up", "w_down")},
                "expert_ids": experts.expert_ids,
                "send_rows": stats.send_rows_W,
                "link_bytes": stats.link_bytes,
                "row_bytes": stats.row_bytes,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[4, 2], ids=["world=devices", "world<devices"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[int, list[dict]]:
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"a2a{world}")
    mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def test_bytes_moved_equal_accounting(ranks: tuple[int, list[dict]]) -> None:
    world, results = ranks
    p = _problem()
    ep = ExpertParallel(Layout.contiguous(E, NODES, GPUS), 0, world)
    rank_layout = ep.rank_layout
    topo = Topology(rank_layout, hidden=H, dispatch_bytes=8, combine_bytes=8)
    # a dropped assignment stays home: count it as a copy to its token's own rank
    home_T = torch.arange(T_TOTAL) // (T_TOTAL // world)
    first_expert = torch.tensor([ep.experts_of(r)[0] for r in range(world)])[home_T]
    experts = torch.where(p["keep"], p["experts"], first_expert[:, None])
    tr = traffic(experts, topo)
    copies = tr.matrices["per_expert"]
    for r, res in enumerate(results):
        sent = list(res["send_rows"])
        sent[r] = 0  # the rank's own rows never leave it
        assert sent == copies[r].tolist()
        assert res["row_bytes"] == H * 8
    row = next(x for x in summarize(tr.token_stats(topo), topo, tr)
               if x["dispatcher"] == "per_expert")
    for phase in ("dispatch", "combine"):
        for link in ("nvlink", "ib"):
            moved = sum(res["link_bytes"][phase][link] for res in results)
            assert moved == pytest.approx(row[f"{link}_{phase}_bytes_per_token"] * T_TOTAL,
                                          rel=1e-12)
    assert sum(res["link_bytes"]["dispatch"]["ib"] for res in results) > 0


def test_expert_parallel_layer_matches_single_process(ranks: tuple[int, list[dict]]) -> None:
    world, results = ranks
    p = _problem()
    x = p["x"].clone().requires_grad_()
    gates = p["gates"].clone().requires_grad_()
    ws = {k: p[k].clone().requires_grad_() for k in ("w_gate", "w_up", "w_down")}
    out = torch.zeros_like(x)
    for k in range(K):
        for e in range(E):
            tok = ((p["experts"][:, k] == e) & p["keep"][:, k]).nonzero().flatten()
            h = F.silu(x[tok] @ ws["w_gate"][e]) * (x[tok] @ ws["w_up"][e])
            out = out.index_add(0, tok, gates[tok, k, None] * (h @ ws["w_down"][e]))
    (out * p["grad_out"]).sum().backward()
    n = T_TOTAL // world
    for r, res in enumerate(results):
        rows = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(res["out"], out[rows].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["grad_x"], x.grad[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["grad_gates"], gates.grad[rows] * p["keep"][rows],
                                   rtol=1e-12, atol=1e-12)
        assert res["expert_ids"] == list(range(r * E // world, (r + 1) * E // world))
        for name, grad in res["grads"].items():
            torch.testing.assert_close(grad, ws[name].grad[res["expert_ids"]],
                                       rtol=1e-12, atol=1e-12)
