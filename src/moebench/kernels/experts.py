"""Grouped expert path: permute assignments by expert, grouped GEMMs, unpermute with the gates.

    y_t = sum_k w_tk * FFN_{e_tk}(x_t),   FFN_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]

([DeepSeekMoE] eq. 3-5 routed part; SwiGLU [Shazeer 2020] eq. 6.) The T*K (token, expert)
assignments are sorted by expert (stable, so tokens keep their order inside an expert), the
rows of x are gathered once into that order, the three matrix products of every expert run
as one `torch._grouped_mm` each (row offsets = cumulative expert counts), and the outputs
are gathered back to [T, K, H] and reduced with the gates by a batched product.

What is fused and why (each step deterministic, no atomics):
- dispatch (`_Dispatch`): forward gathers x by the sort order; its backward is the inverse
  gather plus a sum over the K copies of each token, instead of autograd's
  `index_add` (atomic scatter of bf16 rows).
- SwiGLU (`swiglu`): one Triton kernel forward (read h, u; write a) and one backward (read h,
  u, da; write dh, du) on CUDA, instead of five to seven eager element-wise kernels.
- combine (`_Combine`): y = bmm(w [T,1,K], o[pos] [T,K,H]); backward gives the gate
  gradient <dy_t, o_tk> and the expert-output gradient gathered back into expert order.

Weight shapes (one tensor per projection, experts stacked first):
`w_gate_EHF` [E, H, F], `w_up_EHF` [E, H, F], `w_down_EFH` [E, F, H]; x W means x @ W.

Legend: T tokens, K experts per token, A = T*K assignments, E experts, H hidden, F expert
hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn import functional as F


@dataclass(frozen=True)
class DispatchPlan:
    """Sort of the T*K assignments by expert.

    `order` [A]: flat assignment (t*K + k) at sorted position i; `token` [A]: its token;
    `pos` [A]: sorted position of flat assignment a (the inverse permutation of `order`);
    `offsets` int32 [E]: cumulative row counts per expert (the `_grouped_mm` offsets);
    `counts` int64 [E]: assignments per expert."""

    order: torch.Tensor
    token: torch.Tensor
    pos: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def plan_dispatch(experts_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Stable sort of the assignments by expert id (ties keep token order)."""
    K = experts_TK.shape[1]
    flat_A = experts_TK.reshape(-1)
    order_A = torch.sort(flat_A, stable=True).indices
    pos_A = torch.empty_like(order_A)
    pos_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    counts_E = torch.bincount(flat_A, minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return DispatchPlan(order_A, order_A // K, pos_A, offsets_E, counts_E)


class _Dispatch(torch.autograd.Function):
    """xs[i] = x[token_A[i]]; backward sums the K copies of each token (no atomics)."""

    @staticmethod
    def forward(ctx, x_TH, token_A, pos_A, K):  # type: ignore[override]
        ctx.save_for_backward(pos_A)
        ctx.K = K
        return x_TH.index_select(0, token_A)

    @staticmethod
    def backward(ctx, g_AH):  # type: ignore[override]
        (pos_A,) = ctx.saved_tensors
        T = pos_A.numel() // ctx.K
        g_TKH = g_AH.index_select(0, pos_A).view(T, ctx.K, -1)
        return g_TKH.sum(1, dtype=torch.float32).to(g_AH.dtype), None, None, None


class _Combine(torch.autograd.Function):
    """y_t = sum_k w_tk * o[pos(t, k)] as one batched product; exact inverse gathers back."""

    @staticmethod
    def forward(ctx, o_AH, weights_TK, pos_A, order_A):  # type: ignore[override]
        T, K = weights_TK.shape
        o_TKH = o_AH.index_select(0, pos_A).view(T, K, -1)
        ctx.save_for_backward(o_AH, weights_TK, pos_A, order_A)
        return torch.bmm(weights_TK.to(o_AH.dtype).unsqueeze(1), o_TKH).squeeze(1)

    @staticmethod
    def backward(ctx, g_TH):  # type: ignore[override]
        o_AH, weights_TK, pos_A, order_A = ctx.saved_tensors
        T, K = weights_TK.shape
        g_o = g_w = None
        if ctx.needs_input_grad[0]:
            g_TKH = weights_TK.to(g_TH.dtype).unsqueeze(2) * g_TH.unsqueeze(1)
            g_o = g_TKH.view(T * K, -1).index_select(0, order_A)
        if ctx.needs_input_grad[1]:
            o_TKH = o_AH.index_select(0, pos_A).view(T, K, -1)
            g_w = torch.bmm(o_TKH, g_TH.unsqueeze(2)).squeeze(2).to(weights_TK.dtype)
        return g_o, g_w, None, None


@triton.jit
def _swiglu_fwd_kernel(h_ptr, u_ptr, a_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = h / (1.0 + tl.exp(-h)) * u
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, u_ptr, da_ptr, dh_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-h))
    silu = h * sig
    dh = da * u * sig * (1.0 + h * (1.0 - sig))
    tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (da * silu).to(du_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 2048


class _SwiGLU(torch.autograd.Function):
    """silu(h) * u with one Triton kernel each way (float32 math, storage in h's dtype)."""

    @staticmethod
    def forward(ctx, h, u):  # type: ignore[override]
        h, u = h.contiguous(), u.contiguous()
        a = torch.empty_like(h)
        n = h.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](h, u, a, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(h, u)
        return a

    @staticmethod
    def backward(ctx, da):  # type: ignore[override]
        h, u = ctx.saved_tensors
        da = da.contiguous()
        dh, du = torch.empty_like(h), torch.empty_like(u)
        n = h.numel()
        if n:
            grid = (triton.cdiv(n, _SWIGLU_BLOCK),)
            _swiglu_bwd_kernel[grid](h, u, da, dh, du, n, BLOCK=_SWIGLU_BLOCK)
        return dh, du


def swiglu(h: torch.Tensor, u: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """silu(h) * u; the Triton kernels run when `fused` (default: on CUDA tensors)."""
    if fused is None:
        fused = h.is_cuda
    return _SwiGLU.apply(h, u) if fused else F.silu(h) * u


def _grouped_mm_native(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these operands (CPU: any float; CUDA: bf16, sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cpu":
        return True
    return (
        a.is_cuda
        and a.dtype == b.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(a.device) >= (9, 0)
    )


def grouped_mm(a_AX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = a[rows of expert e] @ b[e]; rows are contiguous per expert,
    ending at `offsets_E[e]`. `torch._grouped_mm` where supported, else a per-expert loop
    with identical semantics (differentiable either way)."""
    if _grouped_mm_native(a_AX, b_EXY):
        return torch._grouped_mm(a_AX, b_EXY, offs=offsets_E)
    bounds = [0, *offsets_E.tolist()]
    parts = [a_AX[bounds[e] : bounds[e + 1]] @ b_EXY[e] for e in range(b_EXY.shape[0])]
    return torch.cat(parts, 0)


def _check_shapes(x_TH, experts_TK, weights_TK, w_gate_EHF, w_up_EHF, w_down_EFH) -> None:
    T, H = x_TH.shape
    E, _, Fh = w_gate_EHF.shape
    expected = {
        "experts_TK": (experts_TK, (T, experts_TK.shape[-1])),
        "weights_TK": (weights_TK, (T, experts_TK.shape[-1])),
        "w_gate_EHF": (w_gate_EHF, (E, H, Fh)),
        "w_up_EHF": (w_up_EHF, (E, H, Fh)),
        "w_down_EFH": (w_down_EFH, (E, Fh, H)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} shape={tuple(tensor.shape)} is invalid; allowed: {shape}")


def grouped_experts(
    x_TH: torch.Tensor,
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_EHF: torch.Tensor,
    w_up_EHF: torch.Tensor,
    w_down_EFH: torch.Tensor,
) -> torch.Tensor:
    """Routed-expert output y [T, H] (dtype of x): sum_k w_tk SwiGLU-FFN_{e_tk}(x_t).

    Differentiable w.r.t. x, the gates and the three weight stacks. `experts_TK` int64 in
    [0, E); gates are cast to x's dtype for the combine product (its accumulation is in
    float32).
    """
    _check_shapes(x_TH, experts_TK, weights_TK, w_gate_EHF, w_up_EHF, w_down_EFH)
    K = experts_TK.shape[1]
    plan = plan_dispatch(experts_TK, w_gate_EHF.shape[0])
    xs_AH = _Dispatch.apply(x_TH, plan.token, plan.pos, K)
    h_AF = grouped_mm(xs_AH, w_gate_EHF, plan.offsets)
    u_AF = grouped_mm(xs_AH, w_up_EHF, plan.offsets)
    o_AH = grouped_mm(swiglu(h_AF, u_AF), w_down_EFH, plan.offsets)
    return _Combine.apply(o_AH, weights_TK, plan.pos, plan.order)


def expert_loop(
    x_TH: torch.Tensor,
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_EHF: torch.Tensor,
    w_up_EHF: torch.Tensor,
    w_down_EFH: torch.Tensor,
) -> torch.Tensor:
    """Per-expert loop reference of `grouped_experts` (same math, one expert at a time)."""
    _check_shapes(x_TH, experts_TK, weights_TK, w_gate_EHF, w_up_EHF, w_down_EFH)
    y_TH = torch.zeros_like(x_TH, dtype=torch.float32)
    for e in range(w_gate_EHF.shape[0]):
        tok, slot = torch.nonzero(experts_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x_nH = x_TH[tok]
        a_nF = F.silu(x_nH @ w_gate_EHF[e]) * (x_nH @ w_up_EHF[e])
        out = (a_nF @ w_down_EFH[e]) * weights_TK[tok, slot].unsqueeze(1).to(x_TH.dtype)
        y_TH = y_TH.index_add(0, tok, out.float())
    return y_TH.to(x_TH.dtype)
