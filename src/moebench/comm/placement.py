"""Expert placement with redundant experts, fitted on a routing trace's expert loads and
judged by replaying held-out tokens (docs/placement.md).

A `Placement` of one MoE layer fills D GPUs x S slots with replicas of the E logical
experts: slot p lives on GPU p // S (node-major, as `Layout`), holds replica
`rank_of_slot[p]` of expert `expert_of_slot[p]`, or nothing (-1). Every expert has m_e >= 1
replicas, ranked 0..m_e-1; R = sum(m_e) - E redundant ones; S = ceil((E + R) / D).

Replica choice rule (per token, stated because the accounting depends on it): round robin
in trace order; the j-th (token, k) pair routed to expert e (j = 0, 1, ...) goes to its
replica of rank j mod m_e. So a replica of rank r carries floor(L_e / m_e) + [r < L_e mod
m_e] of the expert's L_e pairs, exactly, and the fitted loads follow from the placement.

Rules (`RULES`):
- "contiguous": the runs' own layout, blind to load: expert e in slot (e // (E/D)) * S +
  e % (E/D); no replicas, the R spare slots stay empty.
- "eplb": DeepSeek's EPLB hierarchical rule (github.com/deepseek-ai/EPLB, README and
  eplb.py), re-implemented: pack the expert groups onto nodes by load, replicate the experts
  of each node greedily (next replica to the expert of largest load per replica), pack each
  node's replicas onto its GPUs (heaviest first, to the lightest GPU with a free slot). When
  the groups do not divide among the nodes, one global group and node (EPLB's global
  policy). EPLB needs D | E + R; we also allow N | E + R by padding each node's packing
  with zero-load empty slots, which leaves EPLB's result unchanged when D | E + R.
- "search": ours. From both of the above, a local search over replica swaps and moves into
  empty slots, each strictly lowering the busiest GPU's load of the fitted tokens; when the
  expert groups sit on nodes (group-limited routing), moves stay inside a node so the
  routing's node limit still holds. Of the two results, the lower busiest-GPU load wins,
  then the fewer IB bytes on the fitted tokens: never worse than either start.

Objective: the busiest GPU's load (token-expert pairs) over the mean; IB bytes per token
(the "dedup" dispatcher) breaks ties. Legend: E experts, D GPUs, N nodes, G GPUs per node,
S slots per GPU, P = D * S slots, T tokens, K experts per token, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moebench.comm.accounting import summarize, token_stats, traffic
from moebench.comm.topology import Topology
from moebench.routing import Layout

RULES = ("contiguous", "eplb", "search")
MAX_MOVES = 100_000  # bound on local-search moves per start (each strictly improves)


@dataclass(frozen=True)
class Placement:
    """One layer's replicas in slots (module docstring); arrays are int64 [P]."""

    expert_of_slot: np.ndarray
    rank_of_slot: np.ndarray
    num_experts: int
    num_nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        e_P, r_P = self.expert_of_slot, self.rank_of_slot
        D, E = self.num_devices, self.num_experts
        if e_P.shape != r_P.shape or e_P.ndim != 1 or len(e_P) % D:
            raise ValueError(
                f"slots={e_P.shape} is invalid; allowed: [D * S] slots with D={D} GPUs"
            )
        used = e_P >= 0
        if e_P.max(initial=-1) >= E or e_P.min(initial=0) < -1:
            raise ValueError(f"expert ids must lie in -1..{E - 1}")
        counts_E = np.bincount(e_P[used], minlength=E)
        if (counts_E == 0).any():
            raise ValueError(f"experts {np.flatnonzero(counts_E == 0).tolist()} have no replica")
        key = e_P[used] * (counts_E.max() + 1) + r_P[used]
        if (r_P[used] >= counts_E[e_P[used]]).any() or len(np.unique(key)) != used.sum():
            raise ValueError("replica ranks of every expert must be 0..m-1, each once")

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def slots_per_gpu(self) -> int:
        return len(self.expert_of_slot) // self.num_devices

    @property
    def replicas(self) -> np.ndarray:
        """int64 [E]: m_e, the replicas of each expert."""
        used = self.expert_of_slot >= 0
        return np.bincount(self.expert_of_slot[used], minlength=self.num_experts)

    def slot_loads(self, load_E: np.ndarray) -> np.ndarray:
        """int64 [P]: pairs each slot serves under the round-robin rule, given expert loads."""
        e_P, used = self.expert_of_slot, self.expert_of_slot >= 0
        m_P = self.replicas[np.where(used, e_P, 0)]
        load_P = np.asarray(load_E, np.int64)[np.where(used, e_P, 0)]
        return np.where(used, load_P // m_P + (self.rank_of_slot < load_P % m_P), 0)

    def gpu_loads(self, load_E: np.ndarray) -> np.ndarray:
        """int64 [D]: pairs each GPU serves."""
        return self.slot_loads(load_E).reshape(self.num_devices, -1).sum(1)

    def assign(self, experts_TK: np.ndarray) -> np.ndarray:
        """int64 [T, K]: the slot serving each (token, k) pair, by the round-robin rule."""
        flat = np.asarray(experts_TK, np.int64).ravel()
        E = self.num_experts
        order = np.argsort(flat, kind="stable")
        starts_E = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))[:-1]])
        j = np.empty(len(flat), np.int64)
        j[order] = np.arange(len(flat)) - starts_E[flat[order]]
        used = np.flatnonzero(self.expert_of_slot >= 0)
        m_E = self.replicas
        table = np.zeros((E, m_E.max()), np.int64)  # table[e, r] = slot of replica r of e
        table[self.expert_of_slot[used], self.rank_of_slot[used]] = used
        return table[flat, j % m_E[flat]].reshape(np.shape(experts_TK))

    def layout(self) -> Layout:
        """The `Layout` of a placement without replicas or empty slots (slot = position),
        to run it in the expert-parallel layer (`moebench.comm.alltoall`)."""
        if len(self.expert_of_slot) != self.num_experts:
            raise ValueError(
                f"placement has {len(self.expert_of_slot)} slots for {self.num_experts} "
                "experts; allowed: R = 0 (a Layout holds one copy of each expert)"
            )
        return Layout(
            self.num_experts,
            self.num_nodes,
            self.gpus_per_node,
            np.argsort(self.expert_of_slot).tolist(),
        )

    def topology(self, **kwargs: float) -> Topology:
        """The accounting's topology over the P slots (slot p on GPU p // S)."""
        return Topology.build(
            len(self.expert_of_slot), self.num_nodes, self.gpus_per_node, **kwargs
        )


def slots_per_gpu(num_experts: int, redundant: int, num_devices: int) -> int:
    """S = ceil((E + R) / D)."""
    return -(-(num_experts + redundant) // num_devices)


def contiguous(
    num_experts: int, num_nodes: int, gpus_per_node: int, redundant: int = 0
) -> Placement:
    """The runs' layout: expert e on GPU e // (E/D), no replicas, spare slots empty."""
    D = num_nodes * gpus_per_node
    if num_experts % D:
        raise ValueError(f"num_experts={num_experts} is invalid; allowed: a multiple of D={D}")
    S = slots_per_gpu(num_experts, redundant, D)
    e_E = np.arange(num_experts)
    expert_of_slot = np.full(D * S, -1, np.int64)
    expert_of_slot[(e_E // (num_experts // D)) * S + e_E % (num_experts // D)] = e_E
    return Placement(
        expert_of_slot, np.zeros(D * S, np.int64), num_experts, num_nodes, gpus_per_node
    )


def pack(weight_n: np.ndarray, num_packs: int, per_pack: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's balanced packing: items by decreasing weight (ties: lower index first), each
    to the lightest pack (ties: lower pack) with fewer than `per_pack` items; the identity
    when `per_pack` is 1. Returns (pack, rank in pack) per item, int64 [n]."""
    n = len(weight_n)
    if per_pack == 1:
        return np.arange(n), np.zeros(n, np.int64)
    pack_n, rank_n = np.empty(n, np.int64), np.empty(n, np.int64)
    total, count = np.zeros(num_packs), np.zeros(num_packs, np.int64)
    for item in np.argsort(-np.asarray(weight_n, np.float64), kind="stable"):
        open_ = np.flatnonzero(count < per_pack)
        p = open_[np.argmin(total[open_])]
        pack_n[item], rank_n[item] = p, count[p]
        total[p] += weight_n[item]
        count[p] += 1
    return pack_n, rank_n


def replicate(weight_n: np.ndarray, num_replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's replication: one replica each, then every extra one to the expert of largest
    weight per replica (ties: lower index). Returns (expert, rank) per replica, int64
    [num_replicas]: the first n are experts 0..n-1 of rank 0, the extras in order."""
    n = len(weight_n)
    count = np.ones(n, np.int64)
    expert, rank = list(range(n)), [0] * n
    for _ in range(num_replicas - n):
        e = int(np.argmax(np.asarray(weight_n, np.float64) / count))
        expert.append(e)
        rank.append(int(count[e]))
        count[e] += 1
    return np.array(expert, np.int64), np.array(rank, np.int64)


def eplb(
    load_E: np.ndarray, redundant: int, num_groups: int, num_nodes: int, gpus_per_node: int
) -> Placement:
    """EPLB's hierarchical rule (module docstring) for one layer's expert loads."""
    load_E = np.asarray(load_E, np.float64)
    E = len(load_E)
    if num_groups < 1 or E % num_groups:
        raise ValueError(
            f"num_groups={num_groups} is invalid; allowed: a divisor of num_experts={E}"
        )
    check_redundant(redundant, E, num_nodes, num_groups)
    if num_groups % num_nodes:  # EPLB's global policy
        num_groups, N, G = 1, 1, num_nodes * gpus_per_node
    else:
        N, G = num_nodes, gpus_per_node
    S = slots_per_gpu(E, redundant, N * G)
    group_size, groups_per_node, per_node = E // num_groups, num_groups // N, E // N
    # 1. groups onto nodes; node n's experts, in order: its groups by rank, each contiguous
    g_node, g_rank = pack(load_E.reshape(num_groups, group_size).sum(1), N, groups_per_node)
    local_E = np.repeat((g_node * groups_per_node + g_rank) * group_size, group_size)
    local_E += np.tile(np.arange(group_size), num_groups)
    expert_of_local = np.argsort(local_E)
    expert_of_slot = np.full(N * G * S, -1, np.int64)
    rank_of_slot = np.zeros(N * G * S, np.int64)
    for node in range(N):
        experts_n = expert_of_local[node * per_node : (node + 1) * per_node]
        # 2. replicate within the node; 3. replicas onto the node's GPUs (padded: empty slots)
        rep_e, rep_rank = replicate(load_E[experts_n], (E + redundant) // N)
        counts = np.bincount(rep_e, minlength=per_node)
        weight = np.zeros(G * S)
        weight[: len(rep_e)] = load_E[experts_n][rep_e] / counts[rep_e]
        gpu, rank_in_gpu = pack(weight, G, S)
        slot = node * G * S + gpu[: len(rep_e)] * S + rank_in_gpu[: len(rep_e)]
        expert_of_slot[slot], rank_of_slot[slot] = experts_n[rep_e], rep_rank
    return Placement(expert_of_slot, rank_of_slot, E, num_nodes, gpus_per_node)


def improve(
    start: Placement, load_E: np.ndarray, within_node: bool, max_moves: int = MAX_MOVES
) -> Placement:
    """Local search: while some busiest GPU b has one, apply the swap of a slot of b with a
    slot q elsewhere (a replica or an empty slot; inside b's node if `within_node`) that
    lowers b's load with q's GPU staying below b's old load, choosing the smallest new
    max of the two. Each move lowers the sorted GPU loads lexicographically: it ends."""
    e_P, r_P = start.expert_of_slot.copy(), start.rank_of_slot.copy()
    w_P = start.slot_loads(load_E)
    S, G = start.slots_per_gpu, start.gpus_per_node
    gpu_P = np.arange(len(e_P)) // S
    g_D = np.bincount(gpu_P, weights=w_P, minlength=start.num_devices).astype(np.int64)
    for _ in range(max_moves):
        moved = False
        for b in np.flatnonzero(g_D == g_D.max()):
            here = np.arange(b * S, (b + 1) * S)
            scope = (gpu_P // G == b // G) if within_node else True
            there = np.flatnonzero((gpu_P != b) & scope)
            delta = w_P[here][:, None] - w_P[there][None, :]
            new_other = g_D[gpu_P[there]][None, :] + delta
            ok = (delta > 0) & (new_other < g_D[b])
            if not ok.any():
                continue
            cost = np.where(ok, np.maximum(g_D[b] - delta, new_other), np.iinfo(np.int64).max)
            i, j = np.unravel_index(np.argmin(cost), cost.shape)
            p, q = here[i], there[j]
            g_D[b] -= delta[i, j]
            g_D[gpu_P[q]] += delta[i, j]
            for a in (e_P, r_P, w_P):
                a[p], a[q] = a[q], a[p]
            moved = True
            break
        if not moved:
            break
    return Placement(e_P, r_P, start.num_experts, start.num_nodes, start.gpus_per_node)


def check_redundant(redundant: int, num_experts: int, num_nodes: int, num_groups: int) -> None:
    """ValueError naming R unless every rule can place E + R replicas: R >= 0 and, when the
    groups sit on nodes (EPLB's hierarchical policy: (E + R) / N replicas per node), N | E + R."""
    N = num_nodes if num_groups % num_nodes == 0 else 1
    if redundant < 0 or (num_experts + redundant) % N:
        raise ValueError(
            f"redundant={redundant} is invalid; allowed: R >= 0 with E + R = {num_experts} + R "
            f"a multiple of {N} (nodes holding the {num_groups} expert groups)"
        )


def group_aligned(num_groups: int, num_nodes: int) -> bool:
    """Whether EPLB's hierarchical policy applies (groups > 1 divide among the nodes)."""
    return num_groups > 1 and num_groups % num_nodes == 0


def fit(
    rule: str,
    experts_TK: np.ndarray,
    num_experts: int,
    num_nodes: int,
    gpus_per_node: int,
    redundant: int = 0,
    num_groups: int = 1,
    **topo_kwargs: float,
) -> Placement:
    """The placement of `rule` fitted on these tokens' routing (`topo_kwargs`: hidden,
    bytes and bandwidths of the IB tie-break, as `Topology`)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is invalid; allowed: {', '.join(RULES)}")
    if rule == "contiguous":
        return contiguous(num_experts, num_nodes, gpus_per_node, redundant)
    load_E = np.bincount(np.asarray(experts_TK, np.int64).ravel(), minlength=num_experts)
    best = eplb(load_E, redundant, num_groups, num_nodes, gpus_per_node)
    if rule == "eplb":
        return best
    within = group_aligned(num_groups, num_nodes)
    starts = (contiguous(num_experts, num_nodes, gpus_per_node, redundant), best)
    found = [improve(p, load_E, within) for p in starts]

    def key(p: Placement) -> tuple[int, int]:
        stats = token_stats(p.assign(experts_TK), p.topology(**topo_kwargs), threads=1)
        return int(p.gpu_loads(load_E).max()), stats.copies["dedup"]["ib"]

    return min(found, key=key)


def judge(placement: Placement, experts_TK: np.ndarray, **topo_kwargs: float) -> dict[str, Any]:
    """Replay of these (held-out) tokens on the placement: busiest / mean GPU load, GPUs and
    nodes per token, NVLink and IB bytes per token and modeled all-to-all time ("dedup")."""
    slots_TK = placement.assign(experts_TK)
    topo = placement.topology(**topo_kwargs)
    tr = traffic(slots_TK, topo, threads=1)
    row = next(r for r in summarize(tr.token_stats(topo), topo, tr) if r["dispatcher"] == "dedup")
    load_D = np.bincount(slots_TK.ravel() // placement.slots_per_gpu, minlength=topo.num_devices)
    return {
        "busiest_over_mean": float(load_D.max() / load_D.mean()),
        **{
            k: row[k]
            for k in (
                "devices_per_token",
                "nodes_per_token",
                "ib_bytes_per_token",
                "nvlink_bytes_per_token",
                "a2a_time_modeled_us",
            )
        },
    }


def fit_and_judge(
    experts_LTK: np.ndarray,
    num_experts: int,
    num_nodes: int,
    gpus_per_node: int,
    redundant: tuple[int, ...] = (0,),
    num_groups: int = 1,
    rules: tuple[str, ...] = RULES,
    **topo_kwargs: float,
) -> list[dict[str, Any]]:
    """Per layer, rule and R: fit on the first half of the tokens, judge on the second.
    One row per (layer, rule, redundant) with `judge`'s figures plus the fitted balance
    (`fit_busiest_over_mean`) — the entry point for benchmark scripts."""
    T = experts_LTK.shape[1]
    if T < 2:
        raise ValueError(f"trace has T={T} tokens; allowed: T >= 2 (half to fit, half to judge)")
    for r in redundant:
        check_redundant(r, num_experts, num_nodes, num_groups)
    rows = []
    for layer, experts_TK in enumerate(experts_LTK):
        fit_TK, test_TK = experts_TK[: T // 2], experts_TK[T // 2 :]
        load_E = np.bincount(fit_TK.astype(np.int64).ravel(), minlength=num_experts)
        for r in redundant:
            for rule in rules:
                p = fit(
                    rule,
                    fit_TK,
                    num_experts,
                    num_nodes,
                    gpus_per_node,
                    r,
                    num_groups,
                    **topo_kwargs,
                )
                fitted = p.gpu_loads(load_E)
                rows.append(
                    {
                        "layer": layer,
                        "rule": rule,
                        "redundant": r,
                        "slots_per_gpu": p.slots_per_gpu,
                        "fit_busiest_over_mean": float(fitted.max() / fitted.mean()),
                        **judge(p, test_TK, **topo_kwargs),
                    }
                )
    return rows


def groups_of(limit: str | None, num_nodes: int, gpus_per_node: int) -> int:
    """EPLB's expert groups for a router's limit: nodes ("node"), GPUs ("device"), else 1."""
    return {"node": num_nodes, "device": num_nodes * gpus_per_node}.get(limit or "none", 1)
