"""The DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts.

    y_t = FFN_shared(u_t) + sum_i g_{i,t} FFN_i(u_t)           [V2] eq. (20), [V3] eq. (12)

The residual u_t is added by the transformer block, not here ([V3-code] `MoE`/`Block`).
The N_s shared experts are one SwiGLU of width N_s * expert_hidden, the same function as
N_s experts with concatenated weights ([V3-code]; routing.md §1). The router is a bias-free
linear layer computed in float32 (hidden state and weight cast to float32, autocast off:
[HF-V2], [Switch] §2.4); selection and gates come from `moebench.routing.route`, the
aux-loss-free bias only selects ([V3] eq. 16). Capacity dropping (training only, [Switch]
eq. 3, [V2] §2.2.4) zeroes the gate of a dropped assignment without renormalising the rest
(balancing.md §7.3). Each layer returns its alpha-weighted balance losses (balancing.md §1:
the model's aux loss is their sum over MoE layers).

Two expert paths compute the same function:
- "loop": the reference, one gather / SwiGLU / scatter per expert.
- "grouped": assignments sorted by expert (stable, so token order is kept within an
  expert), then one grouped GEMM per projection: `moebench.kernels.experts.grouped_experts`
  (torch._grouped_mm) on CUDA, a loop over the sorted contiguous segments on CPU.

Expert parallelism (`MoETransformer.shard_experts(ExpertParallel)`, used by distributed
training): rank r keeps only the experts the layout places on GPU r. The kept assignments,
sorted by expert as in the grouped path, travel to their expert's rank and back through
`moebench.comm.ep_moe` (the "per_expert" dispatcher: one row per (token, expert) pair,
all_to_all_single with autograd), whatever `impl` says; each received expert batch runs
as one SwiGLU. Capacity is then per rank and micro-batch: T in [Switch] eq. 3 (and the V2
device budget) counts this rank's tokens, as every rank drops before it dispatches. The
batch-wide losses (switch, global) take f from the selection counts all-reduced over the
ranks (global: also summed over the step's micro-batches so far), P from the rank's own
tokens, so the mean over ranks of the rank losses is the loss of the whole batch; the
per-sequence losses need nothing (ranks hold whole sequences).

Legend: T tokens, H d_model, F expert hidden width, E routed experts, K experts per token,
B sequences, S sequence length, A kept (token, slot) assignments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
from moebench.comm.alltoall import DispatchPlan, ep_moe
from moebench.config import RunConfig
from moebench.kernels.experts import grouped_experts
from moebench.routing import Layout, RouterConfig, route

AUX_NAMES = ("switch", "expert", "device", "comm", "seq", "global", "z")


class NonFiniteRouterError(FloatingPointError):
    """Router logits of MoE layer `layer` (0-based among MoE layers) hold NaN or inf."""

    def __init__(self, layer: int) -> None:
        super().__init__(f"router logits of MoE layer {layer} contain NaN or inf")
        self.layer = layer


@dataclass(frozen=True)
class LayerRouting:
    """What one MoE layer routed: `experts_TK` int64, gate `weights_TK` float32 (zero where
    dropped), `keep_TK` bool (False = dropped by capacity), unbiased `scores_TE` float32;
    `comm`: what its all-to-all did, under expert parallelism (else None)."""

    experts_TK: Tensor  # noqa: N815 (contract field names)
    weights_TK: Tensor  # noqa: N815 (contract field names)
    keep_TK: Tensor  # noqa: N815 (contract field names)
    scores_TE: Tensor  # noqa: N815 (contract field names)
    comm: LayerComm | None = None


@dataclass(frozen=True)
class LayerComm:
    """One expert-parallel MoE layer's all-to-all: the `DispatchPlan` (split sizes, bytes sent
    per phase and link, forward wall times) and the bytes per element of what crossed the
    links in each phase (dispatch: the layer input; combine: the experts' output)."""

    plan: DispatchPlan
    dispatch_elem_bytes: int
    combine_elem_bytes: int


@dataclass(frozen=True)
class ExpertParallel:
    """Expert parallelism over the ranks of `group` (None = the default group), whose size
    is `layout.num_devices`: rank `rank` holds the experts the layout places on GPU `rank`
    (and, data parallel, its share of every batch's sequences)."""

    layout: Layout
    rank: int
    group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return self.layout.num_devices

    @property
    def local_experts(self) -> list[int]:
        """Global ids of this rank's experts, ascending."""
        return torch.nonzero(self.layout.device_of_expert == self.rank).flatten().tolist()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def router_config(cfg: RunConfig) -> RouterConfig:
    """The `RouterConfig` of a run: groups are devices (limit=device, [V2] §2.2.2) or nodes
    (limit=node, [V3] §2.1.2) of the topology; "mul" bias for the multiplicative rule."""
    r = cfg.router
    return RouterConfig(
        num_experts=r.num_experts,
        top_k=r.top_k,
        score_fn=r.score_fn,
        num_groups=cfg.num_groups,
        group_limit=r.group_limit if cfg.num_groups > 1 else 1,
        group_score=r.group_score,
        normalize=r.normalize,
        route_scale=r.route_scale,
        bias_mode="mul" if cfg.balance.bias.rule == "multiplicative" else "add",
    )


def run_layout(cfg: RunConfig) -> Layout:
    """Expert placement of the run's topology (contiguous blocks of experts per GPU)."""
    t = cfg.topology
    return Layout.contiguous(cfg.router.num_experts, t.num_nodes, t.gpus_per_node)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) [Shazeer 2020]: the dense FFN and the shared experts."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _sorted_assignments(
    experts_TK: Tensor, gates_TK: Tensor, keep_TK: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Kept (token, slot) assignments sorted by expert, stable (token order kept within an
    expert): their token ids tok_A, expert ids expert_A and gates gate_A."""
    T, K = experts_TK.shape
    flat_keep = keep_TK.reshape(-1)
    expert_A = experts_TK.reshape(-1)[flat_keep]
    gate_A = gates_TK.reshape(-1)[flat_keep]
    tok_A = torch.arange(T, device=experts_TK.device).repeat_interleave(K)[flat_keep]
    order_A = torch.sort(expert_A, stable=True).indices
    return tok_A[order_A], expert_A[order_A], gate_A[order_A]


def _segment_mm(x_AH: Tensor, w_EHF: Tensor, counts: list[int]) -> Tensor:
    """Rows of x sorted by expert times each expert's matrix: one matmul per segment (CPU
    `torch._grouped_mm` needs 16-byte-aligned strides and its backward failed for some
    shapes in torch 2.13; this works for any shape and is deterministic)."""
    parts = [seg @ w_EHF[e] for e, seg in enumerate(x_AH.split(counts)) if counts[e]]
    return torch.cat(parts) if parts else x_AH.new_zeros(0, w_EHF.shape[-1])


class RoutedExperts(nn.Module):
    """E SwiGLU experts of width F stored as stacked matrices (what a grouped GEMM needs):
    w1, w3 [E, H, F] and w2 [E, F, H]; expert e computes (silu(x w1_e) * x w3_e) w2_e.
    After `shard`, row j of the matrices is expert `expert_ids[j]` (this rank's experts)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.expert_ids = list(range(num_experts))

    def shard(self, expert_ids: list[int]) -> None:
        """Keep only the experts `expert_ids` (global ids), as new parameters."""
        index = torch.tensor(expert_ids, dtype=torch.long, device=self.w1.device)
        for name in ("w1", "w3", "w2"):
            full = getattr(self, name).detach()
            setattr(self, name, nn.Parameter(full.index_select(0, index).clone()))
        self.expert_ids = list(expert_ids)

    def _swiglu(self, j: int, x_AH: Tensor) -> Tensor:
        """Stored expert j on the rows x_AH."""
        return (F.silu(x_AH @ self.w1[j]) * (x_AH @ self.w3[j])) @ self.w2[j]

    def forward_loop(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor,
                     keep_TK: Tensor) -> Tensor:
        """Reference path: for each expert, gather its kept tokens, apply it, scatter-add."""
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e in range(self.w1.shape[0]):
            tok_A, slot_A = ((experts_TK == e) & keep_TK).nonzero(as_tuple=True)
            if tok_A.numel() == 0:
                continue
            y_AH = self._swiglu(e, x_TH[tok_A])
            out_TH.index_add_(0, tok_A, y_AH.float() * gates_TK[tok_A, slot_A, None])
        return out_TH.to(x_TH.dtype)

    def forward_grouped(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor,
                        keep_TK: Tensor) -> Tensor:
        """Grouped path: assignments sorted by expert, one grouped GEMM per projection.

        CUDA: `moebench.kernels.experts.grouped_experts` (torch._grouped_mm + fused SwiGLU;
        operands cast to the autocast dtype, dropped assignments carry a zero gate). CPU: the
        kept assignments sorted by expert (stable), one matmul per contiguous segment."""
        if x_TH.is_cuda:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") \
                else x_TH.dtype
            w1, w3, w2 = (w.to(dtype) for w in (self.w1, self.w3, self.w2))
            y_TH = grouped_experts(x_TH.to(dtype), experts_TK, gates_TK, w1, w3, w2)
            return y_TH.to(x_TH.dtype)
        tok_A, expert_A, gate_A = _sorted_assignments(experts_TK, gates_TK, keep_TK)
        counts = torch.bincount(expert_A, minlength=self.w1.shape[0]).tolist()
        x_AH = x_TH[tok_A]
        h_AF = F.silu(_segment_mm(x_AH, self.w1, counts)) * _segment_mm(x_AH, self.w3, counts)
        y_AH = _segment_mm(h_AF, self.w2, counts)
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        out_TH.index_add_(0, tok_A, y_AH.float() * gate_A[:, None])
        return out_TH.to(x_TH.dtype)

    def forward_ep(self, x_TH: Tensor, experts_TK: Tensor, gates_TK: Tensor, keep_TK: Tensor,
                   ep: ExpertParallel) -> tuple[Tensor, LayerComm]:
        """Expert-parallel path (collective: every rank of `ep.group` calls it): each kept
        assignment, sorted by expert, is one row sent to its expert's rank by
        `moebench.comm.ep_moe`, which returns gate * expert output; rows are summed per token
        in the same order as the grouped path. Returns the output and what was sent."""
        tok_A, expert_A, gate_A = _sorted_assignments(experts_TK, gates_TK, keep_TK)
        fns = {e: functools.partial(self._swiglu, j) for j, e in enumerate(self.expert_ids)}
        y_AH, plan = ep_moe(x_TH[tok_A], expert_A[:, None], gate_A[:, None], ep.layout, fns,
                            ep.group)
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        out_TH.index_add_(0, tok_A, y_AH.float())
        return out_TH.to(x_TH.dtype), LayerComm(plan, x_TH.element_size(), y_AH.element_size())


class MoELayer(nn.Module):
    """Shared experts + routed experts of one DeepSeekMoE layer (see the module docstring).

    `index` is the layer's position among the MoE layers (what bias rows, traces and error
    messages refer to). `impl` selects the expert path ("loop" or "grouped").
    """

    def __init__(self, cfg: RunConfig, index: int) -> None:
        super().__init__()
        m, r = cfg.model, cfg.router
        self.index = index
        self.impl = m.expert_impl
        self.balance = cfg.balance
        self.router_cfg = router_config(cfg)
        self.device_of_expert_E: Tensor
        self.register_buffer(
            "device_of_expert_E", run_layout(cfg).device_of_expert.clone(), persistent=False
        )
        # Comm loss M ([V2] eq. 30): the device limit when routing is device-limited, else
        # the most devices a token can reach (min(K, D)); our convention for other limits.
        D = cfg.topology.num_devices
        self.comm_limit = r.group_limit if r.limit == "device" else min(r.top_k, D)
        self.router = nn.Linear(m.d_model, r.num_experts, bias=False)
        hidden_shared = m.n_shared_experts * m.expert_hidden
        self.shared = SwiGLU(m.d_model, hidden_shared) if hidden_shared else None
        self.experts = RoutedExperts(r.num_experts, m.d_model, m.expert_hidden)
        self.ep: ExpertParallel | None = None
        # The global loss's running count: selections of the optimizer step's micro-batches
        # so far, summed over ranks; `reset_global_counts` once per step (docs/global_loss.md).
        self.global_counts_E: Tensor
        self.register_buffer("global_counts_E", torch.zeros(r.num_experts, dtype=torch.int64),
                             persistent=False)

    def reset_global_counts(self) -> None:
        """Start a new optimizer step's running count for the global-batch loss."""
        self.global_counts_E.zero_()

    def router_logits(self, x_TH: Tensor) -> Tensor:
        """float32 [T, E] logits u_t^T e_i with hidden and weight in float32, autocast off."""
        with torch.autocast(x_TH.device.type, enabled=False):
            return F.linear(x_TH.float(), self.router.weight.float())

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
        unbiased top-K ([V3] eq. 18 read literally) for "literal"; balancing.md §5.
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
            counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.router_cfg.num_experts)
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
                protected_T: Tensor | None = None
                ) -> tuple[Tensor, LayerRouting, dict[str, Tensor]]:
        """Returns (shared + routed output [B, S, H], the routing, alpha-weighted aux losses).

        `protected_T` marks tokens exempt from device-level dropping. Raises
        `NonFiniteRouterError` when the router output holds NaN or inf."""
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        logits_TE = self.router_logits(x_TH)
        try:
            routing = route(logits_TE, self.router_cfg, bias_E)
        except ValueError:  # route() refuses NaN/inf logits; say which layer it was
            if not bool(torch.isfinite(logits_TE).all()):
                raise NonFiniteRouterError(self.index) from None
            raise
        keep_TK = self._keep(routing.experts, routing.scores, protected_T)
        gates_TK = routing.weights * keep_TK
        comm = None
        if self.ep is not None:
            y_TH, comm = self.experts.forward_ep(x_TH, routing.experts, gates_TK, keep_TK,
                                                 self.ep)
        else:
            forward = (self.experts.forward_loop if self.impl == "loop"
                       else self.experts.forward_grouped)
            y_TH = forward(x_TH, routing.experts, gates_TK, keep_TK)
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        aux = (self.aux_losses(routing.scores, routing.experts, S, logits_TE)
               if self.training else {})
        layer = LayerRouting(routing.experts, gates_TK.detach(), keep_TK, routing.scores, comm)
        return y_TH.reshape(B, S, H), layer, aux
