"""Expert-parallel dispatch and combine over `torch.distributed` (gloo on CPU, NCCL on GPU).

This is the "per_expert" dispatcher of `moebench.comm.accounting` made real: every (token,
expert) pair's hidden row goes to the rank that owns the expert (rank r = GPU r of the
`Layout`, so the group size must equal `layout.num_devices`), the local experts run there, and
the outputs come back to be summed with the gates ([V3] eq. 12, [V2] eq. 20):

    recv_RH, plan = dispatch(x_TH, experts_TK, layout, group)   # all_to_all_single
    y_RH          = run_experts(recv_RH, plan, expert_fns)        # any callables, model-agnostic
    out_TH        = combine(y_RH, plan, weights_TK)               # reverse all_to_all_single
    out_TH        = ep_moe(x_TH, experts_TK, weights_TK, layout, expert_fns, group)  # all three

Each rank passes its own tokens. The split sizes come from the routing (one row per
(token, slot), rows sorted by destination rank); rows for the rank itself stay local and
cost no link bytes. `plan.link_bytes` holds the bytes this rank sent per phase and link class
(NVLink inside its node, IB across; nodes from the layout), `plan.timings_s` the wall time of
each phase (CUDA synchronised before reading the clock). Autograd: both all-to-alls go
through `AllToAll`, whose backward is the reverse all-to-all (split sizes swapped), so
gradients reach x, the gates and the experts' parameters.

Legend: T local tokens, K experts per token, H hidden, P = T*K (token, slot) pairs,
R rows received, W ranks (= GPUs of the layout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moebench.routing import Layout

ExpertFn = Callable[[Tensor], Tensor]


@dataclass
class DispatchPlan:
    """What `combine` needs to undo `dispatch`, plus what it cost.

    `order`: flat (token, slot) indices in send order (sorted by destination rank);
    `inverse`: its inverse permutation; `send_counts` / `recv_counts`: rows to / from each
    rank; `recv_experts`: the global expert id of every received row; `link_bytes[phase]
    [link]`: bytes this rank sent ("dispatch", "combine"; "nvlink", "ib"); `timings_s[phase]`.
    """

    layout: Layout
    group: dist.ProcessGroup | None
    num_tokens: int
    top_k: int
    order: Tensor
    inverse: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_experts: Tensor
    link_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def local_experts(self) -> list[int]:
        """Global ids of the experts this rank owns."""
        owner_E = self.layout.device_of_expert
        return torch.nonzero(owner_E == self.rank).flatten().tolist()

    def _account(self, phase: str, sent_rows: list[int], row_bytes: int) -> None:
        node_W = self.layout.node_of_device.tolist()
        me = self.rank
        sent = {"nvlink": 0, "ib": 0}
        for r, rows in enumerate(sent_rows):
            if r != me:
                sent["nvlink" if node_W[r] == node_W[me] else "ib"] += rows * row_bytes
        self.link_bytes[phase] = sent


class AllToAll(torch.autograd.Function):
    """Differentiable `dist.all_to_all_single` with split sizes: rows in_splits[r] of the
    input go to rank r; the gradient travels back by the reverse all-to-all."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x_NH: Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_NH.new_empty(sum(out_splits), *x_NH.shape[1:])
        dist.all_to_all_single(out, x_NH.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad_out, in_splits, out_splits, ctx.group), None, None, None


@contextlib.contextmanager
def _timed(timings_s: dict[str, float], phase: str, device: torch.device) -> Iterator[None]:
    """Record the wall time of the block under `phase` (synchronising CUDA around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings_s[phase] = time.perf_counter() - start


def _check_group(layout: Layout, group: dist.ProcessGroup | None) -> None:
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized; call init_process_group first")
    world = dist.get_world_size(group)
    if world != layout.num_devices:
        raise ValueError(
            f"group size={world} is invalid; allowed: layout.num_devices={layout.num_devices} "
            "(one rank per GPU of the layout)"
        )


def dispatch(
    x_TH: Tensor, experts_TK: Tensor, layout: Layout, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, DispatchPlan]:
    """Send the row of every (token, slot) pair to the rank owning its expert.

    Returns the received rows `recv_RH` (ordered by source rank, then by the source's
    (token, slot) order) and the `DispatchPlan`. Collective: every rank of `group` calls it.
    """
    _check_group(layout, group)
    if x_TH.dim() != 2 or experts_TK.dim() != 2 or experts_TK.shape[0] != x_TH.shape[0]:
        raise ValueError(
            f"x_TH shape={tuple(x_TH.shape)}, experts_TK shape={tuple(experts_TK.shape)} are "
            "invalid; allowed: x_TH [T, H] and experts_TK [T, K] with the same T"
        )
    T, K = experts_TK.shape
    W, device = layout.num_devices, x_TH.device
    timings: dict[str, float] = {}
    with _timed(timings, "permute", device):
        experts_P = experts_TK.reshape(-1).long()
        dest_P = layout.device_of_expert.to(device)[experts_P]
        order = torch.argsort(dest_P, stable=True)
        send_W = torch.bincount(dest_P, minlength=W)
        send_PH = x_TH[order // K]
    with _timed(timings, "counts", device):
        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W, group=group)
        send_counts, recv_counts = send_W.tolist(), recv_W.tolist()
    with _timed(timings, "dispatch", device):
        recv_RH = AllToAll.apply(send_PH, recv_counts, send_counts, group)
        recv_experts = experts_P.new_empty(sum(recv_counts))
        dist.all_to_all_single(
            recv_experts, experts_P[order], recv_counts, send_counts, group=group
        )
    plan = DispatchPlan(
        layout=layout,
        group=group,
        num_tokens=T,
        top_k=K,
        order=order,
        inverse=torch.argsort(order),
        send_counts=send_counts,
        recv_counts=recv_counts,
        recv_experts=recv_experts,
        timings_s=timings,
    )
    plan._account("dispatch", send_counts, x_TH.shape[1] * x_TH.element_size())
    return recv_RH, plan


def run_experts(recv_RH: Tensor, plan: DispatchPlan, expert_fns: Mapping[int, ExpertFn]) -> Tensor:
    """Apply this rank's experts to the rows routed to them: y_r = expert_fns[e_r](x_r).

    `expert_fns` maps global expert id -> callable [n, H] -> [n, H_out]; it must hold every
    expert this rank owns (others are ignored). Rows are grouped by expert (stable sort),
    so each callable runs once on a contiguous batch (grouped-GEMM friendly)."""
    mine = plan.local_experts()
    missing = [e for e in mine if e not in expert_fns]
    if missing:
        raise ValueError(f"expert_fns lacks experts {missing} owned by rank {plan.rank}")
    device = recv_RH.device
    with _timed(plan.timings_s, "experts", device):
        by_expert_R = torch.argsort(plan.recv_experts, stable=True)
        counts = torch.bincount(plan.recv_experts, minlength=plan.layout.num_experts)
        sorted_RH = recv_RH[by_expert_R]
        outs, start = [], 0
        for e in mine:
            n = int(counts[e])
            outs.append(expert_fns[e](sorted_RH[start : start + n]))
            start += n
        y_RH = torch.cat(outs)[torch.argsort(by_expert_R)]
    return y_RH


def combine(y_RH: Tensor, plan: DispatchPlan, weights_TK: Tensor) -> Tensor:
    """Return every expert output to its token's rank and sum with the gates:
    out_t = sum_k weights_TK[t, k] * y_{t,k} ([V3] eq. 12). Output dtype: that of y_RH."""
    T, K = plan.num_tokens, plan.top_k
    if weights_TK.shape != (T, K):
        raise ValueError(
            f"weights_TK shape={tuple(weights_TK.shape)} is invalid; allowed: ({T}, {K})"
        )
    device, H = y_RH.device, y_RH.shape[1]
    with _timed(plan.timings_s, "combine", device):
        back_PH = AllToAll.apply(y_RH, plan.send_counts, plan.recv_counts, plan.group)
    plan._account("combine", plan.recv_counts, H * y_RH.element_size())
    with _timed(plan.timings_s, "unpermute", device):
        y_TKH = back_PH[plan.inverse].view(T, K, H)
        out_TH = (weights_TK.to(y_TKH.dtype).unsqueeze(-1) * y_TKH).sum(1)
    return out_TH


def ep_moe(
    x_TH: Tensor,
    experts_TK: Tensor,
    weights_TK: Tensor,
    layout: Layout,
    expert_fns: Mapping[int, ExpertFn],
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, DispatchPlan]:
    """Expert-parallel routed-expert output of a MoE layer: dispatch, local experts, combine.
    Equals sum_k weights_TK[t, k] * FFN_{experts_TK[t, k]}(x_t) computed in one process."""
    recv_RH, plan = dispatch(x_TH, experts_TK, layout, group)
    return combine(run_experts(recv_RH, plan, expert_fns), plan, weights_TK), plan
