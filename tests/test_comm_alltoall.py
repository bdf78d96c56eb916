"""Real expert-parallel all-to-all on 4 gloo processes (2 nodes x 2 GPUs): the bytes moved equal
the accounting of the same routing, and the expert-parallel MoE layer equals the
single-process one, forward and backward."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moebench.comm import Topology, ep_moe, summarize, traffic
from moebench.routing import Layout, preset, route

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # 4 spawned processes: ~20 s

NODES, GPUS, E, K, T_LOCAL, H, FFN = 2, 2, 8, 3, 12, 16, 8
WORLD = NODES * GPUS


def _problem() -> dict[str, torch.Tensor]:
    """The same global batch, routing and expert weights on every rank (float64)."""
    gen = torch.Generator().manual_seed(0)
    T = WORLD * T_LOCAL
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    r = route(torch.randn(T, E, generator=gen), preset("v3", num_experts=E, top_k=K, num_groups=1))
    return {
        "x": x,
        "experts": r.experts,
        "weights": r.weights.double(),
        "w1": torch.randn(E, H, FFN, generator=gen, dtype=torch.float64) / H**0.5,
        "w2": torch.randn(E, FFN, H, generator=gen, dtype=torch.float64) / FFN**0.5,
        "grad_out": torch.randn(T, H, generator=gen, dtype=torch.float64),
    }


def _ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.silu(x @ w1) @ w2


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        p = _problem()
        layout = Layout.contiguous(E, NODES, GPUS)
        rows = slice(rank * T_LOCAL, (rank + 1) * T_LOCAL)
        x = p["x"][rows].clone().requires_grad_()
        weights = p["weights"][rows].clone().requires_grad_()
        mine = torch.nonzero(layout.device_of_expert == rank).flatten().tolist()
        params = {
            e: (p["w1"][e].clone().requires_grad_(), p["w2"][e].clone().requires_grad_())
            for e in mine
        }
        fns = {e: (lambda h, e=e: _ffn(h, *params[e])) for e in mine}
        out, plan = ep_moe(x, p["experts"][rows], weights, layout, fns)
        (out * p["grad_out"][rows]).sum().backward()
        torch.save(
            {
                "out": out.detach(),
                "grad_x": x.grad,
                "grad_weights": weights.grad,
                "grad_params": {e: (a.grad, b.grad) for e, (a, b) in params.items()},
                "send_counts": plan.send_counts,
                "link_bytes": plan.link_bytes,
                "phases": sorted(plan.timings_s),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("a2a")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_bytes_moved_equal_accounting(ranks: list[dict]) -> None:
    p = _problem()
    topo = Topology.build(E, NODES, GPUS, hidden=H, dispatch_bytes=8, combine_bytes=8)
    tr = traffic(p["experts"], topo)
    copies = tr.matrices["per_expert"]
    for r, res in enumerate(ranks):
        sent = list(res["send_counts"])
        sent[r] = 0  # the rank's own rows never leave it
        assert sent == copies[r].tolist()
        assert res["phases"] == ["combine", "counts", "dispatch", "experts", "permute", "unpermute"]
    row = next(
        x for x in summarize(tr.token_stats(topo), topo, tr) if x["dispatcher"] == "per_expert"
    )
    T = WORLD * T_LOCAL
    for phase in ("dispatch", "combine"):
        for link in ("nvlink", "ib"):
            moved = sum(res["link_bytes"][phase][link] for res in ranks)
            assert moved == pytest.approx(row[f"{link}_{phase}_bytes_per_token"] * T, rel=1e-12)
            assert moved > 0  # this routing uses both link classes


def test_expert_parallel_layer_matches_single_process(ranks: list[dict]) -> None:
    p = _problem()
    x = p["x"].clone().requires_grad_()
    weights = p["weights"].clone().requires_grad_()
    w1, w2 = p["w1"].clone().requires_grad_(), p["w2"].clone().requires_grad_()
    out = torch.zeros_like(x)
    for k in range(K):
        for e in range(E):
            sel = p["experts"][:, k] == e
            out = out.index_add(
                0, sel.nonzero().flatten(), weights[sel, k, None] * _ffn(x[sel], w1[e], w2[e])
            )
    (out * p["grad_out"]).sum().backward()
    layout = Layout.contiguous(E, NODES, GPUS)
    for r, res in enumerate(ranks):
        rows = slice(r * T_LOCAL, (r + 1) * T_LOCAL)
        torch.testing.assert_close(res["out"], out[rows].detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["grad_x"], x.grad[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["grad_weights"], weights.grad[rows], rtol=1e-12, atol=1e-12)
        owned = torch.nonzero(layout.device_of_expert == r).flatten().tolist()
        assert sorted(res["grad_params"]) == owned
        for e, (g1, g2) in res["grad_params"].items():
            torch.testing.assert_close(g1, w1.grad[e], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g2, w2.grad[e], rtol=1e-12, atol=1e-12)
