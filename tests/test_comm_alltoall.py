"""Real expert-parallel MoE layer on gloo processes, both dispatchers: the rows each rank
sends equal the accounting of the same routing on the ranks' layout (per destination rank,
phase and link class), and the layer equals the single-process formula, forward and
backward, with the modelled topology equal to the world (4 ranks = 2 nodes x 2 GPUs) and
decoupled from it (2 ranks, each holding one modelled node of 2 GPUs, each its own node).
Some assignments are dropped (capacity): they are never sent. The dedup dispatcher also
runs a node-limited routing (each token on one node), all ranks in one node (only its
in-node hop), a shuffled expert placement and a hand-worked example. The padded, sync-free
per_expert variant (`a2a_capacity_factor`) equals the exact path when its capacity drops
nothing, drops exactly the hand-worked rows at a small one, and makes no host sync in a
step's forward and backward.

Legend: W ranks, E experts, K experts per token, T tokens, H hidden, F expert hidden.
"""

from __future__ import annotations

import contextlib
import math
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moebench.kernels.experts as kernel_experts
from local_servers import free_port
from moebench.comm import Topology, summarize, traffic
from moebench.comm.alltoall import distinct_groups
from moebench.model import ExpertParallel, RoutedExperts
from moebench.model.moe import _capped
from moebench.routing import Layout, preset, route

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # spawned processes: ~20 s

NODES, GPUS, E, K, T_TOTAL, H, FFN = 2, 2, 8, 3, 48, 16, 8
TWO_NODES = Layout.contiguous(E, NODES, GPUS)
ONE_NODE = Layout.contiguous(E, 1, NODES * GPUS)  # all ranks in one node: only the in-node hop
PLACED = Layout(E, NODES, GPUS, placement=[3 * e % E for e in range(E)])  # experts shuffled
PADDED_CF = 4.0  # >= every world tested: the padded all-to-all drops nothing
CASES = {  # case: (dispatcher, routing groups = modelled nodes, M, modelled layout, a2a cf)
    "per_expert": ("per_expert", 1, 1, TWO_NODES, None),
    "per_expert_padded": ("per_expert", 1, 1, TWO_NODES, PADDED_CF),
    "dedup": ("dedup", 1, 1, TWO_NODES, None),
    "dedup_node_limited": ("dedup", NODES, 1, TWO_NODES, None),
    "dedup_one_node": ("dedup", 1, 1, ONE_NODE, None),
    "dedup_placed": ("dedup", 1, 1, PLACED, None),
}
HAND_TK = torch.tensor([[2, 3, 4], [0, 6, 7], [4, 5, 6], [0, 2, 4]])
"""One token per rank of 4 (2 nodes x 2, rank r holds experts 2r, 2r+1), all kept."""
HAND_DISPATCH_WW = {  # rows rank a sends rank b in the dispatch (combine: the transpose)
    # per_expert: token 0 sends 2 rows to rank 1 (experts 2, 3) and 1 to rank 2 (expert 4)
    "per_expert": [[0, 2, 1, 0], [1, 0, 0, 2], [0, 0, 0, 1], [1, 1, 1, 0]],
    # dedup: token 0 goes once to node 1 (relay 2, which holds expert 4 itself) and once to
    # rank 1; token 3 once to node 0 (relay 1 keeps expert 2, forwards expert 0 to rank 0)
    # and once to rank 2; token 1 to relay 3 (experts 6, 7 there) and to rank 0
    "dedup": [[0, 1, 1, 0], [2, 0, 0, 1], [0, 0, 0, 1], [0, 1, 1, 0]],
}
HAND_SMALL_CF = 1.0
"""C = ceil(1 * T K / W) = ceil(3 / 4) = 1 row per rank pair (the rank itself included):
rank 0 sends experts 2, 3 to rank 1 (3 dropped), rank 1 experts 6, 7 to rank 3 (7 dropped),
rank 2 keeps experts 4, 5 (5 dropped), rank 3 sends one row to each: 3 of 12 dropped."""
HAND_SMALL_CF_KEEP_TK = torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 1, 1]]).bool()
SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "unique", "masked_select", "numpy", "bincount")
"""Tensor methods (and torch functions of the same name) that read device data on the host."""


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call `name(*args, **kwargs)` (a `no_host_sync` name) reads device data."""
    if name in ("__getitem__", "__setitem__"):  # a bool mask: nonzero
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if name == "repeat_interleave":  # its output size
        return kwargs.get("output_size") is None
    return True


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make every Python-level call that needs device data on the host raise: `SYNCS`,
    `repeat_interleave` without `output_size`, indexing by a bool mask. The grouped GEMM's
    CPU fallback (a loop over host offsets) is exempt: on a GPU, in bf16 on sm90+,
    `torch._grouped_mm` reads the offsets on the device."""
    allowed = [False]

    def guard(name: str, original: Callable) -> Callable:
        def call(*args: object, **kwargs: object) -> object:
            if not allowed[0] and _syncs(name, args, kwargs):
                raise RuntimeError(f"host sync: {name}")
            return original(*args, **kwargs)
        return call

    def exempt(*args: object) -> torch.Tensor:
        allowed[0] = True
        try:
            return grouped_mm(*args)  # type: ignore[arg-type]
        finally:
            allowed[0] = False

    grouped_mm = kernel_experts.grouped_mm
    with pytest.MonkeyPatch.context() as patch:
        for name in (*SYNCS, "repeat_interleave", "__getitem__", "__setitem__"):
            for owner in (torch.Tensor, torch):
                if hasattr(owner, name):
                    patch.setattr(owner, name, guard(name, getattr(owner, name)))
        patch.setattr(kernel_experts, "grouped_mm", exempt)
        yield


def _problem(groups: int = 1, limit: int = 1) -> dict[str, torch.Tensor]:
    """The same global batch, routing (top-K of `limit` of `groups` node groups), drops and
    expert weights on every rank (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T_TOTAL, H, generator=gen, dtype=torch.float64)
    r = route(torch.randn(T_TOTAL, E, generator=gen),
              preset("v3", num_experts=E, top_k=K, num_groups=groups, group_limit=limit))
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


def _run(p: dict[str, torch.Tensor], experts_TK: torch.Tensor, keep_TK: torch.Tensor,
         dispatcher: str, layout: Layout, rank: int, world: int, cf: float | None = None,
         guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
         ) -> dict:
    """This rank's forward + backward of the sharded layer on its share of the batch, the
    step under `guard` (a warm-up step before it, when one is given)."""
    ep = ExpertParallel(layout, rank, world, dispatcher=dispatcher, a2a_capacity_factor=cf)
    experts = RoutedExperts(E, H, FFN).double()
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            getattr(experts, name).copy_(p[name])
    experts.shard(ep)
    n = len(experts_TK) // world
    rows = slice(rank * n, (rank + 1) * n)
    x = p["x"][rows].clone().requires_grad_()
    gates = (p["gates"][rows] * keep_TK[rows]).clone().requires_grad_()
    warm_up = [] if guard is contextlib.nullcontext else [contextlib.nullcontext]
    for context in (*warm_up, guard):  # the warm-up fills the host-side caches
        experts.zero_grad()
        x.grad = gates.grad = None
        with context():
            out, stats = experts(x, experts_TK[rows], gates, keep_TK[rows])
            (out * p["grad_out"][rows]).sum().backward()
    return {
        "out": out.detach(),
        "grad_x": x.grad,
        "grad_gates": gates.grad,
        "grads": {k: getattr(experts, k).grad for k in ("w_gate", "w_up", "w_down")},
        "expert_ids": experts.expert_ids,
        "sent_rows_W": stats.sent_rows_W,
        "link_bytes": stats.link_bytes,
        "moved_link_bytes": stats.moved_link_bytes,
        "row_bytes": stats.row_bytes,
        "dropped": None if stats.dropped is None else int(stats.dropped),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for case, (dispatcher, groups, limit, layout, cf) in CASES.items():
            p = _problem(groups, limit)
            results[case] = _run(p, p["experts"], p["keep"], dispatcher, layout, rank, world,
                                 cf)
        p = _problem()
        for case, cf in (("sync_free", PADDED_CF), ("sync_exact", None)):
            try:
                results[case] = _run(p, p["experts"], p["keep"], "per_expert", TWO_NODES, rank,
                                     world, cf, no_host_sync)
            except RuntimeError:  # reported by the tests, not by the spawn
                results[case] = {"error": traceback.format_exc()}
        if world == len(HAND_TK):
            all_kept = torch.ones_like(HAND_TK, dtype=torch.bool)
            for dispatcher in HAND_DISPATCH_WW:
                results[f"hand_{dispatcher}"] = _run(p, HAND_TK, all_kept, dispatcher,
                                                     TWO_NODES, rank, world)
            results["hand_small_cf"] = _run(p, HAND_TK, all_kept, "per_expert", TWO_NODES,
                                            rank, world, HAND_SMALL_CF)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distinct_groups_by_hand() -> None:
    group_NK = torch.tensor([[1, 0, 1], [2, 2, 2], [0, 2, 0]])  # 2 groups; 2 = no group
    assert distinct_groups(group_NK, 2).tolist() == [[0, 1], [2, 2], [0, 2]]
    assert distinct_groups(torch.tensor([[3, 1, 3]]), 4).tolist() == [[1, 3, 4]]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_distinct_groups_lists_each_group_once(groups: int, k: int, data: st.DataObject
                                               ) -> None:
    rows = data.draw(st.lists(st.lists(st.integers(0, groups), min_size=k, max_size=k),
                              min_size=1, max_size=8))
    group_NS = distinct_groups(torch.tensor(rows), groups)
    assert group_NS.shape == (len(rows), min(k, groups))
    for row, got in zip(rows, group_NS.tolist(), strict=True):
        distinct = sorted(set(row) - {groups})
        assert got == distinct + [groups] * (len(got) - len(distinct))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), min_size=1, max_size=4),
       st.integers(0, 12))
def test_capped_counts_are_those_of_the_first_rows(counts: list[list[int]], capacity: int
                                                   ) -> None:
    """Row w of the padded send: its first `capacity` rows in local-expert order."""
    got_WL = _capped(torch.tensor(counts), capacity)
    for row, got in zip(counts, got_WL.tolist(), strict=True):
        first = [x for x, n in enumerate(row) for _ in range(n)][:capacity]
        assert got == [first.count(x) for x in range(len(row))]


def test_unknown_dispatcher_is_refused() -> None:
    with pytest.raises(ValueError, match="dispatcher='twostage' is invalid; allowed: "
                                         "per_expert, dedup"):
        ExpertParallel(TWO_NODES, 0, 2, dispatcher="twostage")


@pytest.fixture(scope="module")
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict]]:
    """world -> every rank's results, each world spawned once per module."""
    cache: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in cache:
            out_dir = tmp_path_factory.mktemp(f"a2a{world}")
            mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world)
            cache[world] = [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
        return cache[world]

    return results


WORLDS = pytest.mark.parametrize("world", [4, 2], ids=["world=devices", "world<devices"])


def _accounting(experts_TK: torch.Tensor, keep_TK: torch.Tensor, world: int, dispatcher: str,
                layout: Layout = TWO_NODES) -> tuple[torch.Tensor, dict]:
    """The accounting's [W, W] dispatch copies and summary row for this routing on the
    ranks' layout; a dropped assignment stays home, so it counts as a copy to an expert of
    its token's own rank (free under both dispatchers)."""
    ep = ExpertParallel(layout, 0, world)
    topo = Topology(ep.rank_layout, hidden=H, dispatch_bytes=8, combine_bytes=8)
    home_T = torch.arange(len(experts_TK)) // (len(experts_TK) // world)
    first_expert = torch.tensor([ep.experts_of(r)[0] for r in range(world)])[home_T]
    tr = traffic(torch.where(keep_TK, experts_TK, first_expert[:, None]), topo)
    row = next(x for x in summarize(tr.token_stats(topo), topo, tr)
               if x["dispatcher"] == dispatcher)
    return torch.from_numpy(tr.matrices[dispatcher]), row


@WORLDS
@pytest.mark.parametrize("case", CASES)
def test_rows_moved_equal_accounting(spawn: Callable[[int], list[dict]], world: int,
                                     case: str) -> None:
    results = spawn(world)
    dispatcher, groups, limit, layout, _ = CASES[case]
    p = _problem(groups, limit)
    copies_WW, row = _accounting(p["experts"], p["keep"], world, dispatcher, layout)
    for r, res in enumerate(results):
        assert res[case]["sent_rows_W"]["dispatch"] == copies_WW[r].tolist()
        assert res[case]["sent_rows_W"]["combine"] == copies_WW[:, r].tolist()
        assert res[case]["row_bytes"] == H * 8
    for phase in ("dispatch", "combine"):
        for link in ("nvlink", "ib"):
            moved = sum(res[case]["link_bytes"][phase][link] for res in results)
            assert moved == pytest.approx(row[f"{link}_{phase}_bytes_per_token"] * T_TOTAL,
                                          rel=1e-12)
    link = "ib" if layout.num_nodes > 1 else "nvlink"
    assert sum(res[case]["link_bytes"]["dispatch"][link] for res in results) > 0


@WORLDS
def test_dedup_saves_rows_and_node_limit_saves_more(spawn: Callable[[int], list[dict]],
                                                    world: int) -> None:
    results = spawn(world)

    def ib(case: str) -> int:
        return sum(res[case]["link_bytes"]["dispatch"]["ib"] for res in results)

    assert ib("dedup_node_limited") < ib("dedup") < ib("per_expert")


def test_hand_worked_rows(spawn: Callable[[int], list[dict]]) -> None:
    world = len(HAND_TK)
    results = spawn(world)
    keep = torch.ones_like(HAND_TK, dtype=torch.bool)
    for dispatcher, rows_WW in HAND_DISPATCH_WW.items():
        sent_WW = torch.tensor([res[f"hand_{dispatcher}"]["sent_rows_W"]["dispatch"]
                                for res in results])
        back_WW = torch.tensor([res[f"hand_{dispatcher}"]["sent_rows_W"]["combine"]
                                for res in results])
        assert sent_WW.tolist() == rows_WW
        assert back_WW.tolist() == sent_WW.T.tolist()
        assert _accounting(HAND_TK, keep, world, dispatcher)[0].tolist() == rows_WW


def _single_process(p: dict[str, torch.Tensor], experts_TK: torch.Tensor,
                    keep_TK: torch.Tensor) -> dict:
    """The layer's formula on one process, per (slot, expert), with its gradients."""
    x = p["x"][: len(experts_TK)].clone().requires_grad_()
    gates = (p["gates"][: len(experts_TK)] * keep_TK).clone().requires_grad_()
    ws = {k: p[k].clone().requires_grad_() for k in ("w_gate", "w_up", "w_down")}
    out = torch.zeros_like(x)
    for k in range(experts_TK.shape[1]):
        for e in range(E):
            tok = ((experts_TK[:, k] == e) & keep_TK[:, k]).nonzero().flatten()
            h = F.silu(x[tok] @ ws["w_gate"][e]) * (x[tok] @ ws["w_up"][e])
            out = out.index_add(0, tok, gates[tok, k, None] * (h @ ws["w_down"][e]))
    (out * p["grad_out"][: len(experts_TK)]).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "grad_gates": gates.grad * keep_TK,
            "grads": {name: w.grad for name, w in ws.items()}}


@pytest.mark.parametrize(("world", "case"), [
    *((w, c) for w in (4, 2) for c in (*CASES, "sync_free")), (len(HAND_TK), "hand_dedup"),
    (len(HAND_TK), "hand_small_cf")])
def test_expert_parallel_layer_matches_single_process(spawn: Callable[[int], list[dict]],
                                                      world: int, case: str) -> None:
    results = spawn(world)
    if case.startswith("hand"):  # small cf: the exact path without the rows dropped
        p, layout, experts_TK = _problem(), TWO_NODES, HAND_TK
        keep_TK = HAND_SMALL_CF_KEEP_TK if case == "hand_small_cf" else HAND_TK >= 0
    elif case == "sync_free":
        p, layout = _problem(), TWO_NODES
        experts_TK, keep_TK = p["experts"], p["keep"]
    else:
        _, groups, limit, layout, _ = CASES[case]
        p = _problem(groups, limit)
        experts_TK, keep_TK = p["experts"], p["keep"]
    want = _single_process(p, experts_TK, keep_TK)
    n = len(experts_TK) // world
    for r, res in enumerate(results):
        got, rows = res[case], slice(r * n, (r + 1) * n)
        assert "error" not in got, got
        for name in ("out", "grad_x", "grad_gates"):
            torch.testing.assert_close(got[name], want[name][rows], rtol=1e-12, atol=1e-12)
        # rank r holds modelled devices [r D/W, (r+1) D/W): their experts, device-major
        devices = range(r * layout.num_devices // world, (r + 1) * layout.num_devices // world)
        assert got["expert_ids"] == [e for d in devices for e in range(E)
                                     if layout.device_of_expert[e] == d]
        for name, grad in got["grads"].items():
            torch.testing.assert_close(grad, want["grads"][name][got["expert_ids"]],
                                       rtol=1e-12, atol=1e-12)


@WORLDS
def test_padded_bytes_include_the_padding(spawn: Callable[[int], list[dict]], world: int
                                          ) -> None:
    """Each rank moves C = ceil(cf T K / W) rows to every other rank and phase; the useful
    rows are the exact path's (`test_rows_moved_equal_accounting`); nothing dropped."""
    results = spawn(world)
    C = math.ceil(PADDED_CF * (T_TOTAL // world) * K / world)
    for r, res in enumerate(results):
        got = res["per_expert_padded"]
        assert got["dropped"] == 0
        assert got["sent_rows_W"] == res["per_expert"]["sent_rows_W"]
        rank_layout = ExpertParallel(TWO_NODES, r, world).rank_layout
        for phase in ("dispatch", "combine"):
            moved = {"nvlink": 0, "ib": 0}
            for other in range(world):
                if other != r:
                    same = rank_layout.node_of_device[other] == rank_layout.node_of_device[r]
                    moved["nvlink" if same else "ib"] += C * H * 8
            assert got["moved_link_bytes"][phase] == moved


def test_small_capacity_drops_the_hand_worked_rows(spawn: Callable[[int], list[dict]]
                                                   ) -> None:
    results = spawn(len(HAND_TK))
    dropped = [res["hand_small_cf"]["dropped"] for res in results]
    assert dropped == [1, 1, 1, 0]
    assert sum(dropped) / HAND_TK.numel() == 0.25
    sent_WW = [res["hand_small_cf"]["sent_rows_W"]["dispatch"] for res in results]
    assert sent_WW == [[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]]


def test_padded_capacity_is_refused_with_dedup() -> None:
    with pytest.raises(ValueError,
                       match=r"a2a_capacity_factor=1\.0 is invalid with dispatcher='dedup'"):
        ExpertParallel(TWO_NODES, 0, 2, dispatcher="dedup", a2a_capacity_factor=1.0)


def test_the_sync_guard_catches_the_exact_path(spawn: Callable[[int], list[dict]]) -> None:
    """The guard of the sync-free test is live: the exact path reads its split sizes."""
    for res in spawn(2):
        assert "host sync: tolist" in res["sync_exact"]["error"]
