"""The collectives of expert parallelism over `torch.distributed` (gloo on CPU, NCCL on GPU).

The expert-parallel MoE layer (`moebench.model.moe.RoutedExperts`) is the one-GPU expert path
plus what this module provides, for each all-to-all ("hop") of its dispatch:

    splits = exchange_counts(counts_WX, group)   # rows to each rank (per kind), and back
    recv   = AllToAll.apply(rows, splits.recv_rows_W, splits.send_rows_W, group)   # out
    ...
    back   = AllToAll.apply(out, splits.send_rows_W, splits.recv_rows_W, group)    # back
    stats  = A2AStats.of([splits, ...], node_W, rank, row_bytes, timer)

The two dispatchers of `moebench.comm.accounting`, made real (`ExpertParallel.dispatcher`):
"per_expert" is one hop, one row per kept (token, expert) pair to the rank that owns the
expert; "dedup" is two hops, one row per (token, node) to the rank of that node with the
source's in-node index, then one row per (token, rank) inside the node (`distinct_groups`:
the nodes / ranks a row goes to). Rows for the rank itself stay local and cost
no link bytes. "per_expert" with `ExpertParallel.a2a_capacity_factor` exchanges a fixed
number of rows per rank pair, padded (`A2AStats.padded`): no host sync, rows beyond it
dropped. `A2AStats.link_bytes` holds the useful bytes this rank sent per phase and link
class (NVLink inside its node, IB across; nodes of the real ranks' layout),
`moved_link_bytes` those really moved (padding included), `A2AStats.seconds` the time of
each phase (`PhaseTimer`: CUDA events, read only when asked, so timing adds no host sync).
Autograd: `AllToAll`'s backward is the reverse all-to-all.

Legend: W ranks, X kinds of row (local experts), N rows, K slots of a row, H hidden.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

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


@dataclass(frozen=True)
class Splits:
    """The split sizes of one all-to-all: `recv_counts_WX` (device tensor) rows this rank
    receives from rank w of kind x (a local expert, or one kind); `send_rows_W` /
    `recv_rows_W` rows sent to / received from each rank (host lists)."""

    recv_counts_WX: Tensor  # noqa: N815 (shape suffix)
    send_rows_W: list[int]  # noqa: N815 (shape suffix)
    recv_rows_W: list[int]  # noqa: N815 (shape suffix)

    @property
    def sent_rows(self) -> int:
        return sum(self.send_rows_W)

    @property
    def received_rows(self) -> int:
        return sum(self.recv_rows_W)


@dataclass
class A2AStats:
    """What one expert-parallel layer's all-to-alls moved, as this rank sent it.

    `rows_PW` int64 [phase, W]: useful rows sent to each rank per phase (`PHASES`; own
    entry 0: rows that stay on the rank cross no link), a tensor read only when asked (no
    host sync in the forward); `padded_rows_PW`: rows really moved, padding included, where
    a fixed capacity pads them (else None: the useful rows); `dropped`: 0-dim int64, the
    assignments that capacity dropped (else None); `node_W`: the node of every rank;
    `row_bytes`: bytes per row; `timer` times the phases."""

    rows_PW: Tensor  # noqa: N815 (shape suffix)
    node_W: list[int]  # noqa: N815 (shape suffix)
    rank: int
    row_bytes: int
    timer: PhaseTimer | None = None
    padded_rows_PW: Tensor | None = None  # noqa: N815 (shape suffix)
    dropped: Tensor | None = None

    @classmethod
    def of(cls, hops: list[Splits], node_W: list[int], rank: int, row_bytes: int,
           timer: PhaseTimer | None) -> A2AStats:
        """The stats of a dispatch made of the all-to-alls `hops` (in order) and of the
        combine that reverses each (it sends what the hop received); rank w is in node
        `node_W[w]`, which sets the link class."""
        rows_PW = torch.zeros(len(PHASES), len(node_W), dtype=torch.int64)
        for hop in hops:
            rows_PW += torch.tensor([hop.send_rows_W, hop.recv_rows_W])
        rows_PW[:, rank] = 0
        return cls(rows_PW, node_W, rank, row_bytes, timer)

    @classmethod
    def padded(cls, send_counts_WX: Tensor, recv_counts_WX: Tensor, capacity: int,
               dropped: Tensor, node_W: list[int], rank: int, row_bytes: int,
               timer: PhaseTimer | None) -> A2AStats:
        """The stats of one all-to-all of `capacity` rows per rank pair (each way), of which
        `send_counts_WX` / `recv_counts_WX` (device) are useful; `dropped` did not fit."""
        rows_PW = torch.stack((send_counts_WX.sum(1), recv_counts_WX.sum(1)))
        padded_PW = torch.full((len(PHASES), len(node_W)), capacity, dtype=torch.int64)
        rows_PW[:, rank], padded_PW[:, rank] = 0, 0
        return cls(rows_PW, node_W, rank, row_bytes, timer, padded_PW, dropped)

    @property
    def sent_rows_W(self) -> dict[str, list[int]]:  # noqa: N802 (shape suffix)
        """Useful rows sent to each rank per phase (a host sync when on a GPU)."""
        return dict(zip(PHASES, self.rows_PW.tolist(), strict=True))

    def _per_link(self, rows_PW: Tensor) -> dict[str, dict[str, int]]:
        """Rows per phase and link class: to ranks of this rank's node over NVLink, to other
        nodes over IB."""
        out = {}
        for phase, rows_W in zip(PHASES, rows_PW.tolist(), strict=True):
            sent = dict.fromkeys(LINKS, 0)
            for r, rows in enumerate(rows_W):
                sent["nvlink" if self.node_W[r] == self.node_W[self.rank] else "ib"] += rows
            out[phase] = sent
        return out

    @property
    def link_rows(self) -> dict[str, dict[str, int]]:
        """Useful rows sent per phase and link class (what the accounting predicts)."""
        return self._per_link(self.rows_PW)

    @property
    def link_bytes(self) -> dict[str, dict[str, int]]:
        """Useful bytes sent per phase and link class."""
        return self._bytes(self.link_rows)

    @property
    def moved_link_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes really moved per phase and link class, padding included."""
        rows_PW = self.rows_PW if self.padded_rows_PW is None else self.padded_rows_PW
        return self._bytes(self._per_link(rows_PW))

    def _bytes(self, rows: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {phase: {link: n * self.row_bytes for link, n in per_link.items()}
                for phase, per_link in rows.items()}

    @property
    def seconds(self) -> dict[str, float]:
        return self.timer.seconds() if self.timer is not None else {}


def exchange_counts(send_counts_WX: Tensor, group: dist.ProcessGroup | None) -> Splits:
    """All-to-all of the per-(rank, kind) row counts [W, X] (int64), then the split sizes
    on the host: the one host sync of an all-to-all."""
    recv_counts_WX = torch.empty_like(send_counts_WX)
    dist.all_to_all_single(recv_counts_WX, send_counts_WX.contiguous(), group=group)
    send_W, recv_W = torch.stack((send_counts_WX.sum(1), recv_counts_WX.sum(1))).tolist()
    return Splits(recv_counts_WX, send_W, recv_W)


def distinct_groups(group_NK: Tensor, groups: int) -> Tensor:
    """[N, min(K, groups)]: the distinct groups of each row's K slots, ascending, padded with
    `groups` (which also marks a slot of no group): one column per copy a dedup hop sends."""
    sorted_NK = group_NK.sort(1).values
    repeat_NK = torch.zeros_like(sorted_NK, dtype=torch.bool)
    repeat_NK[:, 1:] = sorted_NK[:, 1:] == sorted_NK[:, :-1]
    distinct_NK = torch.where(repeat_NK, groups, sorted_NK).sort(1).values
    return distinct_NK[:, : min(group_NK.shape[1], groups)]
