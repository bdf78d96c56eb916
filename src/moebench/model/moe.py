"""The DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts.

    y_t = FFN_shared(u_t) + sum_i g_{i,t} FFN_i(u_t)           [V2] eq. (20), [V3] eq. (12)

The residual u_t is added by the transformer block, not here ([V3-code] `MoE`/`Block`).
The N_s shared experts are one SwiGLU of width N_s * expert_hidden, the same function as
N_s experts with concatenated weights ([V3-code]; docs/routing.md §1). The router is a
bias-free linear layer computed in float32 (hidden state and weight cast to float32,
autocast off: [HF-V2], [Switch] §2.4); selection and gates come from `moebench.routing.route`
(or, on CUDA, the fused Triton router `moebench.kernels.route_fused`, which computes the same
selection), the aux-loss-free bias only selects ([V3] eq. 16). Capacity dropping (training
only, [Switch] eq. 3, [V2] §2.2.4) zeroes the gate of a dropped assignment without
renormalising the rest (docs/balancing.md §7.3). Each layer returns its alpha-weighted
balance losses (docs/balancing.md §1: the model's aux loss is their sum over MoE layers).

One routed-expert implementation (`RoutedExperts`), whatever the device:
- one device: `moebench.kernels.grouped_experts` on CUDA (assignments sorted by expert,
  Triton row movement, gate and up in one grouped GEMM, no host sync); on CPU the kept
  assignments sorted by expert (stable), one matmul per expert segment, an ordered
  `index_add_` (deterministic, bitwise reproducible);
- expert parallelism (`MoETransformer.shard_experts(ExpertParallel)`): the same local
  computation (`moebench.kernels.expert_ffn`) wrapped in two all-to-alls. The assignments
  are sorted by (owning rank, local expert), dropped ones last; the kept rows travel in the
  compute dtype (bf16 under autocast) to their rank by `moebench.comm.alltoall`, are regrouped
  by local expert there, run as one grouped GEMM, and come back to be summed with the gates
  ("per_expert" dispatcher; with `ExpertParallel.a2a_capacity_factor`, a fixed number of
  rows per rank pair, padded, so no host sync, rows beyond it dropped); or ("dedup",
  `ExpertParallel.dispatcher`) each token goes once to each node and once to each rank of
  its kept experts, which sums their gated outputs (docs/metrics.md §4.1). Capacity is
  then per rank and micro-batch: T in [Switch] eq. 3 (and the V2 device budget) counts this
  rank's tokens, as every rank drops before it dispatches. The batch-wide losses (switch,
  global) take f from the selection counts all-reduced over the ranks (global: also summed
  over the optimizer step's micro-batches so far), P from the rank's own tokens, so the mean
  over ranks of the rank losses is the loss of the whole batch; the per-sequence losses need
  nothing (ranks hold whole sequences).

No host synchronisation in the forward on one GPU, nor under expert parallelism with the
padded all-to-all: the finiteness of the router logits is returned as a device flag
(`LayerRouting.finite`) that the trainer checks once per step.

Legend: T tokens, H d_model, F expert hidden width, E routed experts, K experts per token,
B sequences, S sequence length, A kept (token, slot) assignments, W expert-parallel ranks,
L local experts of a rank, R rows a rank receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.balancing import (
    comm_loss,
    device_drop,
    device_loss,
    drop_by_capacity,
    expert_capacity,
    expert_loss,
    global_loss,
    literal_topk,
    seq_loss,
    switch_loss,
    z_loss,
)
from moebench.comm.accounting import DISPATCHERS
from moebench.comm.alltoall import (
    A2AStats,
    AllToAll,
    PhaseTimer,
    Splits,
    distinct_groups,
    exchange_counts,
)
from moebench.config import BalanceConfig
from moebench.kernels import (
    ExpertPlan,
    combine_rows,
    dispatch_rows,
    expert_ffn,
    grouped_experts,
    permute_rows,
    plan_dispatch,
    route_fused,
    supports,
)
from moebench.metrics import expert_load
from moebench.routing import Layout, RouterConfig, Routing, route
from moebench.routing.router import scores as affinities

AUX_NAMES = ("switch", "expert", "device", "comm", "seq", "global", "z")


@dataclass(frozen=True)
class MoEConfig:
    """One DeepSeekMoE layer: widths, the router, the expert placement (whose devices are
    the router's groups under device-limited routing) and the balancing settings."""

    d_model: int
    expert_hidden: int
    n_shared_experts: int
    router: RouterConfig
    layout: Layout
    balance: BalanceConfig
    comm_limit: int
    """M of the V2 communication loss ([V2] eq. 30): the device limit under device-limited
    routing, else min(K, D), the most devices a token can reach (our convention)."""


@dataclass(frozen=True)
class LayerRouting:
    """What one MoE layer routed: `experts_TK` int64, gate `weights_TK` float32 (zero where
    dropped), `keep_TK` bool (False = dropped by capacity), unbiased `scores_TE` float32,
    `finite`: 0-dim bool, whether the router logits were finite; `comm`: what its all-to-all
    did, under expert parallelism (else None)."""

    experts_TK: Tensor  # noqa: N815 (contract field names)
    weights_TK: Tensor  # noqa: N815 (contract field names)
    keep_TK: Tensor  # noqa: N815 (contract field names)
    scores_TE: Tensor  # noqa: N815 (contract field names)
    finite: Tensor
    comm: A2AStats | None = None


@dataclass(frozen=True)
class Hop:
    """What the combine needs to reverse one dedup hop: the plan that sorted the rows'
    copies by group, which copies were sent (`sent_NS`) and the split sizes."""

    plan: ExpertPlan
    sent_NS: Tensor  # noqa: N815 (shape suffix)
    splits: Splits


@dataclass(frozen=True)
class ExpertParallel:
    """Expert parallelism over the `world_size` ranks of `group` (None = the default group).

    The modelled `layout` (its devices and nodes define routing groups and the byte
    accounting) is independent of the world size: the experts, in the layout's device-major
    order, are cut into `world_size` contiguous blocks, one per rank, so a rank holds whole
    modelled devices when world_size divides the device count. Any divisor of the expert
    count works, and the same study trains on 1, 2 or 8 GPUs with identical routing.
    `dispatcher`: how tokens travel, "per_expert" or "dedup" (`moebench.comm.alltoall`).
    `a2a_capacity_factor` (per_expert only; None: exact split sizes, one host sync per
    layer): every rank pair exchanges a fixed `a2a_capacity` rows, padded, with no host
    sync; rows beyond it are dropped (none at a factor >= W)."""

    layout: Layout
    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None
    dispatcher: str = "per_expert"
    a2a_capacity_factor: float | None = None

    def __post_init__(self) -> None:
        E, W = self.layout.num_experts, self.world_size
        if W < 1 or E % W:
            raise ValueError(f"world_size={W} is invalid; allowed: a divisor of the {E} experts")
        if not 0 <= self.rank < W:
            raise ValueError(f"rank={self.rank} is invalid; allowed: 0..{W - 1}")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={self.dispatcher!r} is invalid; allowed: "
                             f"{', '.join(DISPATCHERS)}")
        cf = self.a2a_capacity_factor
        if cf is not None and (not cf > 0 or self.dispatcher != "per_expert"):
            raise ValueError(f"a2a_capacity_factor={cf} is invalid with dispatcher="
                             f"{self.dispatcher!r}; allowed: None, or > 0 with 'per_expert'")

    def a2a_capacity(self, assignments: int) -> int:
        """C = ceil(factor * T K / W): rows each rank sends to each rank per all-to-all,
        for a rank's `assignments` = T K (its micro-batch); needs `a2a_capacity_factor`."""
        assert self.a2a_capacity_factor is not None
        return math.ceil(self.a2a_capacity_factor * assignments / self.world_size)

    @property
    def experts_per_rank(self) -> int:
        return self.layout.num_experts // self.world_size

    @cached_property
    def expert_order(self) -> Tensor:
        """int64 [E]: expert ids in device-major order (the order ranks split them in)."""
        E = self.layout.num_experts
        key_E = self.layout.device_of_expert.long() * E + torch.arange(E)
        return torch.argsort(key_E)

    @cached_property
    def slot_of_expert(self) -> Tensor:
        """int64 [E]: position of each expert in `expert_order` (rank = slot // L)."""
        slot_E = torch.empty(self.layout.num_experts, dtype=torch.long)
        slot_E[self.expert_order] = torch.arange(self.layout.num_experts)
        return slot_E

    def experts_of(self, rank: int) -> list[int]:
        """Global ids of rank `rank`'s experts, in the order its weights store them."""
        L = self.experts_per_rank
        return self.expert_order[rank * L : (rank + 1) * L].tolist()

    @property
    def local_experts(self) -> list[int]:
        return self.experts_of(self.rank)

    @cached_property
    def rank_layout(self) -> Layout:
        """The real ranks as a layout of W devices holding their experts (placement: each
        expert's slot), for the bytes that really cross links: ranks in the same modelled
        node share a node when W is a multiple of the modelled node count; otherwise every
        rank is its own node."""
        nodes = self.layout.num_nodes
        if self.world_size % nodes:
            nodes = self.world_size
        return Layout(self.layout.num_experts, nodes, self.world_size // nodes,
                      self.slot_of_expert)

    @cached_property
    def node_of_rank(self) -> list[int]:
        """The node of each real rank in `rank_layout` (what sets a link's class)."""
        return self.rank_layout.node_of_device.tolist()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) * w_up x) [Shazeer 2020]: the dense FFN and the shared experts."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype on CUDA when autocast is on, else x's dtype."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def _row_bytes(x_TH: Tensor) -> int:
    """Bytes of one all-to-all row: d_model elements in the compute dtype."""
    return x_TH.shape[1] * torch.finfo(_compute_dtype(x_TH)).bits // 8


def _pad_rows(x_NH: Tensor, rows: int) -> Tensor:
    """x with zero rows appended up to `rows` rows (a shape known on the host)."""
    if x_NH.shape[0] == rows:
        return x_NH
    return torch.cat((x_NH, x_NH.new_zeros(rows - x_NH.shape[0], *x_NH.shape[1:])))


def _capped(counts_WL: Tensor, capacity: int) -> Tensor:
    """The counts that fit when only the first `capacity` rows of each row w (in l order)
    are kept: cumulative counts clipped at `capacity`, differenced."""
    kept_WL = counts_WL.cumsum(1).clamp(max=capacity)
    return torch.diff(kept_WL, dim=1, prepend=kept_WL.new_zeros(len(kept_WL), 1))


def sorted_experts_cpu(x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor, keep_TK: Tensor,
                       w_gate_EHF: Tensor, w_up_EHF: Tensor, w_down_EFH: Tensor) -> Tensor:
    """The CPU routed-expert path: kept assignments sorted by expert (stable), `expert_ffn`
    on the segments, then an ordered float32 `index_add_` (deterministic on CPU)."""
    T, K = experts_TK.shape
    flat_keep = keep_TK.reshape(-1)
    order_A = torch.sort(experts_TK.reshape(-1)[flat_keep], stable=True).indices
    tok_A = torch.arange(T).repeat_interleave(K)[flat_keep][order_A]
    expert_A = experts_TK.reshape(-1)[flat_keep][order_A]
    counts_E = torch.bincount(expert_A, minlength=w_gate_EHF.shape[0])
    y_AH = expert_ffn(x_TH[tok_A], counts_E.cumsum(0), w_gate_EHF, w_up_EHF, w_down_EFH)
    gate_A = gates_TK.reshape(-1)[flat_keep][order_A]
    out_TH = torch.zeros(x_TH.shape, dtype=torch.float32)
    out_TH.index_add_(0, tok_A, y_AH.float() * gate_A[:, None])
    return out_TH.to(x_TH.dtype)


class RoutedExperts(nn.Module):
    """E SwiGLU experts of width F stored as stacked matrices (what a grouped GEMM needs):
    w_gate, w_up [E, H, F] and w_down [E, F, H]; expert e computes
    (silu(x w_gate_e) * x w_up_e) w_down_e. After `shard`, row j of the matrices is expert
    `expert_ids[j]` (this rank's experts)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.expert_ids = list(range(num_experts))
        self.ep: ExpertParallel | None = None

    def shard(self, ep: ExpertParallel) -> None:
        """Keep only this rank's experts (as new parameters) and compute expert-parallel."""
        index = torch.tensor(ep.local_experts, dtype=torch.long, device=self.w_gate.device)
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(self, name).detach()
            setattr(self, name, nn.Parameter(full.index_select(0, index).clone()))
        self.expert_ids = ep.local_experts
        self.ep = ep
        self.slot_of_expert_E: Tensor  # on the device once: no host-to-device copy per step
        self.register_buffer("slot_of_expert_E", ep.slot_of_expert.to(self.w_gate.device),
                             persistent=False)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))  # type: ignore[return-value]

    def forward(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor, keep_TK: Tensor,
                timer: PhaseTimer | None = None) -> tuple[Tensor, A2AStats | None]:
        """sum_k gate_tk FFN_{e_tk}(x_t) [T, H] in x's dtype, and the all-to-all's
        statistics under expert parallelism (collective then: every rank calls it)."""
        if self.ep is not None:
            forward = (self._forward_dedup if self.ep.dispatcher == "dedup"
                       else self._forward_per_expert if self.ep.a2a_capacity_factor is None
                       else self._forward_padded)
            return forward(x_TH, experts_TK, gates_TK, keep_TK,
                           timer or PhaseTimer(x_TH.device, enabled=False))
        if x_TH.is_cuda:  # dropped assignments are computed with a zero gate: no host sync
            dtype = _compute_dtype(x_TH)
            y_TH = grouped_experts(x_TH.to(dtype), experts_TK, gates_TK, *self._weights(dtype))
            return y_TH.to(x_TH.dtype), None
        return sorted_experts_cpu(x_TH, experts_TK, gates_TK, keep_TK, self.w_gate, self.w_up,
                                  self.w_down), None

    def _stats(self, hops: list[Splits], x_TH: Tensor, timer: PhaseTimer) -> A2AStats:
        """What the hops moved, rows of d_model elements in the compute dtype."""
        ep = self.ep
        assert ep is not None
        return A2AStats.of(hops, ep.node_of_rank, ep.rank, _row_bytes(x_TH), timer)

    def _permute(self, x_TH: Tensor, experts_TK: Tensor, keep_TK: Tensor
                 ) -> tuple[ExpertPlan, Tensor]:
        """The kept assignments' rows in the compute dtype, sorted by (owning rank, local
        expert), dropped ones last, and the plan that sorted them."""
        ep = self.ep
        assert ep is not None
        E = ep.layout.num_experts
        key_TK = torch.where(keep_TK, self.slot_of_expert_E[experts_TK], E)  # dropped: last
        plan = plan_dispatch(key_TK, E + 1)
        return plan, dispatch_rows(x_TH.to(_compute_dtype(x_TH)), plan, x_TH.is_cuda)

    def _local_experts(self, recv_RH: Tensor, expert_R: Tensor, offsets_L: Tensor) -> Tensor:
        """This rank's experts on received rows: regrouped by local expert `expert_R` (L:
        padding, last) with a stable device sort, `expert_ffn` (rows of expert l end at
        `offsets_L[l]`), and back to the received order (padding rows: unspecified)."""
        R = recv_RH.shape[0]
        fused = recv_RH.is_cuda
        by_expert_R = torch.sort(expert_R, stable=True).indices
        inverse_R = torch.empty_like(by_expert_R)
        inverse_R[by_expert_R] = torch.arange(R, device=recv_RH.device)
        h_RH = permute_rows(recv_RH, by_expert_R, inverse_R, fused)
        o_RH = _pad_rows(expert_ffn(h_RH, offsets_L, *self._weights(recv_RH.dtype)), R)
        return permute_rows(o_RH, inverse_R, by_expert_R, fused)

    def _forward_per_expert(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor,
                            keep_TK: Tensor, timer: PhaseTimer) -> tuple[Tensor, A2AStats]:
        """The "per_expert" dispatcher: permute -> dispatch -> `expert_ffn` on this rank's
        experts -> combine -> unpermute (see the module docstring). One host sync: the split
        sizes of the all-to-all."""
        ep = self.ep
        assert ep is not None
        T, K = experts_TK.shape
        E, W, L = ep.layout.num_experts, ep.world_size, ep.experts_per_rank
        with timer("permute"):
            plan, xs_AH = self._permute(x_TH, experts_TK, keep_TK)
        with timer("counts"):
            splits = exchange_counts(plan.counts[:E].view(W, L), ep.group)
        with timer("dispatch"):
            recv_RH = AllToAll.apply(xs_AH[: splits.sent_rows], splits.recv_rows_W,
                                     splits.send_rows_W, ep.group)
        with timer("experts"):
            # rows arrive grouped by source rank, each source's rows sorted by local expert
            expert_R = torch.arange(L, device=x_TH.device).repeat(W).repeat_interleave(
                splits.recv_counts_WX.reshape(-1), output_size=splits.received_rows)
            offsets_L = splits.recv_counts_WX.sum(0).cumsum(0).to(torch.int32)
            back_RH = self._local_experts(recv_RH, expert_R, offsets_L)
        with timer("combine"):
            o_sent_AH = AllToAll.apply(back_RH, splits.send_rows_W, splits.recv_rows_W, ep.group)
        with timer("unpermute"):
            y_TH = combine_rows(_pad_rows(o_sent_AH, T * K), gates_TK, plan, x_TH.is_cuda)
        return y_TH.to(x_TH.dtype), self._stats([splits], x_TH, timer)

    def _forward_padded(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor,
                        keep_TK: Tensor, timer: PhaseTimer) -> tuple[Tensor, A2AStats]:
        """The "per_expert" dispatcher with a fixed capacity C (`ExpertParallel.a2a_capacity`)
        per rank pair: no host sync. Each rank sends C rows to each rank: its first C rows
        for it in (local expert, token) order, zero-padded; the rest are dropped (output 0,
        counted in `A2AStats.dropped`). The counts per (rank, local expert) travel by a
        fixed-size all-to-all read only on the device."""
        ep = self.ep
        assert ep is not None
        T, K = experts_TK.shape
        E, W, L = ep.layout.num_experts, ep.world_size, ep.experts_per_rank
        C = ep.a2a_capacity(T * K)
        dev = x_TH.device
        j_WC = torch.arange(C, device=dev).repeat(W, 1)  # slot j of the rows to each rank
        with timer("permute"):
            plan, xs_AH = self._permute(x_TH, experts_TK, keep_TK)
            counts_WL = plan.counts[:E].view(W, L)
            rows_W = counts_WL.sum(1)
            first_W1 = _pad_rows(rows_W.cumsum(0), W + 1).roll(1)  # first row of each rank
            # the sent rows: the first C of each rank; T K (an appended zero row) pads
            src_WC = torch.where(j_WC < rows_W[:, None], first_W1[:W, None] + j_WC, T * K)
            send_WCH = _pad_rows(xs_AH, T * K + 1)[src_WC]
            send_counts_WL = _capped(counts_WL, C)
        with timer("counts"):
            recv_counts_WL = torch.empty_like(send_counts_WL)
            dist.all_to_all_single(recv_counts_WL, send_counts_WL, group=ep.group)
        with timer("dispatch"):
            recv_RH = AllToAll.apply(send_WCH.flatten(0, 1), [C] * W, [C] * W, ep.group)
        with timer("experts"):
            # from each source: C rows, sorted by local expert, then padding (expert L)
            expert_WC = torch.searchsorted(recv_counts_WL.cumsum(1), j_WC, right=True)
            offsets_L = recv_counts_WL.sum(0).cumsum(0).to(torch.int32)
            back_RH = self._local_experts(recv_RH, expert_WC.flatten(), offsets_L)
        with timer("combine"):
            o_WCH = AllToAll.apply(back_RH, [C] * W, [C] * W, ep.group)
        with timer("unpermute"):
            # sorted assignment a: slot j of rank w where it was sent, else the zero row W C
            a_A = torch.arange(T * K, device=dev)
            rank_A = torch.searchsorted(first_W1[1:], a_A, right=True)  # W: dropped before
            j_A = a_A - first_W1[rank_A]
            slot_A = torch.where((rank_A < W) & (j_A < C), rank_A * C + j_A, W * C)
            o_AH = _pad_rows(o_WCH, W * C + 1)[slot_A]
            y_TH = combine_rows(o_AH, gates_TK, plan, x_TH.is_cuda)
        dropped = (rows_W - C).clamp(min=0).sum()
        stats = A2AStats.padded(send_counts_WL, recv_counts_WL, C, dropped, ep.node_of_rank,
                                ep.rank, _row_bytes(x_TH), timer)
        return y_TH.to(x_TH.dtype), stats

    def _forward_dedup(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor,
                       keep_TK: Tensor, timer: PhaseTimer) -> tuple[Tensor, A2AStats]:
        """The "dedup" dispatcher ([V3] §3.2.2; docs/metrics.md §4.1): hop 1 sends each token
        once to every node of its kept experts (to the rank there with this rank's in-node
        index), hop 2 once to every rank of that node holding some, which sums its experts'
        gated outputs; the combine reverses both hops, the relay summing the ranks' sums.
        Rows carry their K slots (int32 expert slot, -1 = elsewhere or dropped) and gates. A
        hop that could only reach the rank itself (one node; one rank per node) is skipped.
        Host syncs: the split sizes of each hop, the expert rows."""
        ep = self.ep
        assert ep is not None
        W, L = ep.world_size, ep.experts_per_rank
        G = ep.rank_layout.gpus_per_node
        node, index = divmod(ep.rank, G)
        dtype = _compute_dtype(x_TH)
        dev = x_TH.device
        h_QH = x_TH.to(dtype)
        slot_QK = torch.where(keep_TK, self.slot_of_expert_E[experts_TK], -1).int()
        gates_QK, hops = gates_TK, []
        if W > G:  # to the nodes: the rank with this rank's in-node index there
            node_QK = torch.where(slot_QK >= 0, slot_QK // (L * G), W // G)
            relay_N = torch.arange(W // G, device=dev) * G + index
            h_QH, slot_QK, gates_QK, hop = self._hop(h_QH, slot_QK, gates_QK, node_QK,
                                                     relay_N, timer)
            hops.append(hop)
        if G > 1:  # to the ranks of this node
            rank_QK = torch.where(slot_QK >= 0, slot_QK // L - node * G, G)
            ranks_G = torch.arange(G, device=dev) + node * G
            h_QH, slot_QK, gates_QK, hop = self._hop(h_QH, slot_QK, gates_QK, rank_QK,
                                                     ranks_G, timer)
            hops.append(hop)
        with timer("experts"):
            local_QK = torch.where(slot_QK >= 0, slot_QK - ep.rank * L, L)  # L: elsewhere
            plan = plan_dispatch(local_QK, L + 1)
            xs_AH = dispatch_rows(h_QH, plan, x_TH.is_cuda)
            rows = int(plan.offsets[L - 1])
            o_AH = expert_ffn(xs_AH[:rows], plan.offsets[:L], *self._weights(dtype))
            y_QH = combine_rows(_pad_rows(o_AH, xs_AH.shape[0]), gates_QK, plan, x_TH.is_cuda)
        for hop in reversed(hops):
            y_QH = self._hop_back(y_QH.to(dtype), hop, timer)
        return y_QH.to(x_TH.dtype), self._stats([hop.splits for hop in hops], x_TH, timer)

    def _hop(self, h_NH: Tensor, slot_NK: Tensor, gates_NK: Tensor, group_NK: Tensor,
             rank_G: Tensor, timer: PhaseTimer) -> tuple[Tensor, Tensor, Tensor, Hop]:
        """One dedup hop: row n goes once to each group g of its slots (`group_NK`, G = no
        group) on rank `rank_G[g]`, with the slots and gates of that group only. Returns
        the rows, slots and gates received and what `_hop_back` needs."""
        ep = self.ep
        assert ep is not None
        K, G = slot_NK.shape[1], len(rank_G)
        with timer("permute"):
            group_NS = distinct_groups(group_NK, G)  # copy s of row n goes to group_NS[n, s]
            plan = plan_dispatch(group_NS, G + 1)
            xs_AH = dispatch_rows(h_NH, plan, h_NH.is_cuda)
            same_NSK = group_NS[:, :, None] == group_NK[:, None, :]
            slot_AK = torch.where(same_NSK, slot_NK[:, None, :], -1).view(-1, K)[plan.order]
            gates_AK = (gates_NK[:, None, :] * same_NSK).view(-1, K)[plan.order]
        with timer("counts"):
            counts_W = torch.zeros(ep.world_size, dtype=torch.int64, device=h_NH.device)
            splits = exchange_counts(counts_W.index_copy(0, rank_G, plan.counts[:G])[:, None],
                                     ep.group)
        with timer("dispatch"):
            n = splits.sent_rows
            out = [AllToAll.apply(t[:n], splits.recv_rows_W, splits.send_rows_W, ep.group)
                   for t in (xs_AH, slot_AK, gates_AK)]
        return out[0], out[1], out[2], Hop(plan, group_NS < G, splits)

    def _hop_back(self, y_RH: Tensor, hop: Hop, timer: PhaseTimer) -> Tensor:
        """The reverse of `_hop`: each received row's result goes back, and row n gets the
        sum of its groups' results (float32 accumulation, `combine_rows`)."""
        ep = self.ep
        assert ep is not None
        with timer("combine"):
            back_AH = AllToAll.apply(y_RH, hop.splits.send_rows_W, hop.splits.recv_rows_W,
                                     ep.group)
        with timer("unpermute"):
            return combine_rows(_pad_rows(back_AH, hop.sent_NS.numel()), hop.sent_NS.float(),
                                hop.plan, y_RH.is_cuda)


class MoELayer(nn.Module):
    """Shared experts + routed experts of one DeepSeekMoE layer (see the module docstring).

    `index` is the layer's position among the MoE layers (what bias rows, traces and error
    messages refer to)."""

    def __init__(self, cfg: MoEConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.balance = cfg.balance
        self.router_cfg = cfg.router
        self.device_of_expert_E: Tensor
        self.register_buffer(
            "device_of_expert_E", cfg.layout.device_of_expert.clone(), persistent=False
        )
        self.comm_limit = cfg.comm_limit
        self.router = nn.Linear(cfg.d_model, cfg.router.num_experts, bias=False)
        hidden_shared = cfg.n_shared_experts * cfg.expert_hidden
        self.shared = SwiGLU(cfg.d_model, hidden_shared) if hidden_shared else None
        self.experts = RoutedExperts(cfg.router.num_experts, cfg.d_model, cfg.expert_hidden)
        # The fused router computes the reference selection exactly where `supports` holds.
        probe = torch.empty(0, cfg.router.num_experts)
        self.fused_router = supports(cfg.router, probe)
        # The global loss's running count: selections of the optimizer step's micro-batches
        # so far, summed over ranks; `reset_global_counts` once per step (docs/global_loss.md).
        self.global_counts_E: Tensor
        self.register_buffer("global_counts_E",
                             torch.zeros(cfg.router.num_experts, dtype=torch.int64),
                             persistent=False)

    @property
    def ep(self) -> ExpertParallel | None:
        return self.experts.ep

    def reset_global_counts(self) -> None:
        """Start a new optimizer step's running count for the global-batch loss."""
        self.global_counts_E.zero_()

    def router_logits(self, x_TH: Tensor) -> Tensor:
        """float32 [T, E] logits u_t^T e_i with hidden and weight in float32, autocast off."""
        with torch.autocast(x_TH.device.type, enabled=False):
            return F.linear(x_TH.float(), self.router.weight.float())

    def route(self, logits_TE: Tensor, bias_E: Tensor | None) -> Routing:
        """The routing of finite logits: the fused Triton router on CUDA, else the reference
        (`moebench.routing.route`); the caller checks finiteness (`LayerRouting.finite`)."""
        if logits_TE.is_cuda and self.fused_router:
            fused = route_fused(logits_TE, self.router_cfg, bias_E)
            return Routing(fused.experts, fused.weights,
                           affinities(logits_TE, self.router_cfg.score_fn))
        return route(logits_TE, self.router_cfg, bias_E, check_values=False)

    def _keep(self, experts_TK: Tensor, scores_TE: Tensor, protected_T: Tensor | None
              ) -> Tensor:
        """bool [T, K]: assignments within capacity (all True at eval or without a factor).

        level "expert": per-expert capacity ceil(T K / E * factor) ([Switch] eq. 3);
        level "device": V2 device budget, `protected_T` tokens never dropped ([V2] §2.2.4)."""
        cap = self.balance.capacity
        T, K = experts_TK.shape
        if not self.training or cap.factor is None:
            return torch.ones(T, K, dtype=torch.bool, device=experts_TK.device)
        if cap.level == "expert":
            capacity = expert_capacity(T, self.router_cfg.num_experts, K, cap.factor)
            return drop_by_capacity(experts_TK, scores_TE, capacity, cap.policy)
        return device_drop(experts_TK, scores_TE, self.device_of_expert_E, cap.factor,
                           protected_T)

    def aux_losses(self, scores_TE: Tensor, experts_TK: Tensor, seq_len: int,
                   logits_TE: Tensor) -> dict[str, Tensor]:
        """alpha-weighted auxiliary losses of this layer, only those with alpha > 0.

        f counts `experts_TK` (the routing performed) for aux_counts="actual", or the plain
        unbiased top-K ([V3] eq. 18 read literally) for "literal"; docs/balancing.md §5.
        Sequence-level scopes ([V2] eq. 23-31 and [V3] eq. 17 with T = one sequence) use
        `seq_len`; switch uses the whole micro-batch (of all ranks: f from the counts
        all-reduced over them under expert parallelism); global takes f from the running
        count of the optimizer step (this micro-batch added, all ranks; docs/global_loss.md);
        z (the router z-loss) the raw `logits_TE`."""
        b = self.balance
        alphas = {name: getattr(b, f"{name}_alpha") for name in AUX_NAMES}
        if not any(alphas.values()):
            return {}
        if b.aux_counts == "literal":
            experts_TK = literal_topk(scores_TE, self.router_cfg.top_k)
        dev_E = self.device_of_expert_E
        counts_E = None
        if (self.ep is not None and alphas["switch"]) or alphas["global"]:
            counts_E = expert_load(experts_TK, self.router_cfg.num_experts)  # no host sync
            if self.ep is not None:
                counts_E = self.ep.all_reduce_sum(counts_E)
        if alphas["global"]:
            self.global_counts_E += counts_E
        terms = {
            "switch": lambda: switch_loss(scores_TE, experts_TK,
                                          counts_E if self.ep is not None else None),
            "expert": lambda: expert_loss(scores_TE, experts_TK, seq_len),
            "device": lambda: device_loss(scores_TE, experts_TK, dev_E, seq_len),
            "comm": lambda: comm_loss(scores_TE, experts_TK, dev_E, self.comm_limit, seq_len),
            "seq": lambda: seq_loss(scores_TE, experts_TK, seq_len),
            "global": lambda: global_loss(scores_TE, experts_TK, self.global_counts_E),
            "z": lambda: z_loss(logits_TE),
        }
        return {name: alpha * terms[name]() for name, alpha in alphas.items() if alpha > 0}

    def forward(self, x_BSH: Tensor, bias_E: Tensor | None = None,
                protected_T: Tensor | None = None, timer: PhaseTimer | None = None
                ) -> tuple[Tensor, LayerRouting, dict[str, Tensor]]:
        """Returns (shared + routed output [B, S, H], the routing, alpha-weighted aux losses).

        `protected_T` marks tokens exempt from device-level dropping; `timer` times the
        expert-parallel phases. Non-finite logits are routed as zeros and flagged
        (`LayerRouting.finite`), so the caller decides when to look (one sync per step)."""
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        logits_TE = self.router_logits(x_TH)
        finite = torch.isfinite(logits_TE).all()
        routing = self.route(torch.where(finite, logits_TE, 0.0), bias_E)
        keep_TK = self._keep(routing.experts, routing.scores, protected_T)
        gates_TK = routing.weights * keep_TK
        y_TH, comm = self.experts(x_TH, routing.experts, gates_TK, keep_TK, timer)
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        aux = (self.aux_losses(routing.scores, routing.experts, S, logits_TE)
               if self.training else {})
        layer = LayerRouting(routing.experts, gates_TK.detach(), keep_TK, routing.scores,
                             finite, comm)
        return y_TH.reshape(B, S, H), layer, aux
