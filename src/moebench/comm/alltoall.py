"""The collectives of expert parallelism over `torch.distributed` (gloo on CPU, NCCL on GPU).

The expert-parallel MoE layer (`moebench.model.moe.RoutedExperts`) is the one-GPU expert path
plus what this module provides:

    stats = exchange_counts(counts_WL, group)     # rows to each rank's local experts, and back
    recv  = AllToAll.apply(rows, stats.recv_rows_W, stats.send_rows_W, group)   # dispatch
    ...   local experts: moebench.kernels.expert_ffn
    back  = AllToAll.apply(out, stats.send_rows_W, stats.recv_rows_W, group)    # combine
    stats.account(rank_layout, rank, row_bytes, timer)

This is the "per_expert" dispatcher of `moebench.comm.accounting` made real: one row per
kept (token, expert) pair goes to the rank that owns the expert; rows for the rank itself
stay local and cost no link bytes. `A2AStats.link_bytes` holds the bytes this rank sent per
phase and link class (NVLink inside its node, IB across; nodes of the real ranks' layout),
`A2AStats.seconds` the time of each phase (`PhaseTimer`: CUDA events, read only when asked,
so timing adds no host sync). Autograd: `AllToAll`'s backward is the reverse all-to-all.

Legend: W ranks, L local experts per rank, R rows received, N rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moebench.routing import Layout

PHASES = ("dispatch", "combine")
LINKS = ("nvlink", "ib")


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


class PhaseTimer:
    """Times named phases of the forward: CUDA events on a GPU (read by `seconds`, after the
    work finished, so no sync is added), the host clock on CPU; a no-op when disabled."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self._marks: dict[str, list[tuple[object, object]]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks.setdefault(phase, []).append((start, end))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase, summed over every time it was timed (e.g. all MoE layers);
        synchronises on the last event on a GPU."""
        out = {}
        for phase, marks in self._marks.items():
            if self.cuda:
                marks[-1][1].synchronize()  # type: ignore[attr-defined]
                out[phase] = sum(a.elapsed_time(b) for a, b in marks) / 1e3  # type: ignore[attr-defined]
            else:
                out[phase] = sum(b - a for a, b in marks)  # type: ignore[operator]
        return out


@dataclass
class A2AStats:
    """The split sizes of one expert-parallel layer's all-to-alls and what they cost.

    `recv_counts_WL` (device tensor): rows this rank receives from rank w for its local
    expert l; `send_rows_W` / `recv_rows_W`: rows sent to / received from each rank (host
    lists, the split sizes); `link_bytes[phase][link]`: bytes this rank sent; `seconds`."""

    recv_counts_WL: Tensor  # noqa: N815 (shape suffix)
    send_rows_W: list[int]  # noqa: N815 (shape suffix)
    recv_rows_W: list[int]  # noqa: N815 (shape suffix)
    link_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    row_bytes: int = 0
    timer: PhaseTimer | None = None

    @property
    def sent_rows(self) -> int:
        return sum(self.send_rows_W)

    @property
    def received_rows(self) -> int:
        return sum(self.recv_rows_W)

    @property
    def seconds(self) -> dict[str, float]:
        return self.timer.seconds() if self.timer is not None else {}

    def account(self, layout: Layout, rank: int, row_bytes: int,
                timer: PhaseTimer | None) -> None:
        """Bytes sent per phase and link class: rows to other ranks of this rank's node over
        NVLink, to other nodes over IB (nodes of `layout`, whose devices are the ranks)."""
        node_W = layout.node_of_device.tolist()
        self.row_bytes, self.timer = row_bytes, timer
        for phase, rows_W in (("dispatch", self.send_rows_W), ("combine", self.recv_rows_W)):
            sent = dict.fromkeys(LINKS, 0)
            for r, rows in enumerate(rows_W):
                if r != rank:
                    sent["nvlink" if node_W[r] == node_W[rank] else "ib"] += rows * row_bytes
            self.link_bytes[phase] = sent


def exchange_counts(send_counts_WL: Tensor, group: dist.ProcessGroup | None) -> A2AStats:
    """All-to-all of the per-(rank, local expert) row counts [W, L] (int64), then the split
    sizes on the host: the one host sync of an expert-parallel layer."""
    recv_counts_WL = torch.empty_like(send_counts_WL)
    dist.all_to_all_single(recv_counts_WL, send_counts_WL.contiguous(), group=group)
    send_W, recv_W = torch.stack((send_counts_WL.sum(1), recv_counts_WL.sum(1))).tolist()
    return A2AStats(recv_counts_WL, send_W, recv_W)
