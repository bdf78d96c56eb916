"""Grouped expert path: permute assignments by expert, grouped GEMMs, unpermute with the gates.

    y_t = sum_k w_tk * FFN_{e_tk}(x_t),   FFN_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]

([DSMoE] eq. 3-5 routed part; SwiGLU [Shazeer 2020] eq. 6.) The T*K (token, expert)
assignments are sorted by expert (stable, so tokens keep their order inside an expert), the
rows of x are copied once into that order, the matrix products of every expert run as one
`torch._grouped_mm` each (row offsets = cumulative expert counts), and the expert outputs
are reduced per token with the gates.

What is fused and why (each step deterministic, no atomics; measured in
results/benchmarks/h100-2026-11-23/NOTES.md). With `triton_kernels` (default: on CUDA) the
row movement is two Triton kernels, one program per token, that touch each row once:
- scatter (`_scatter_rows`): reads x_t once and writes its K copies into expert order
  (dispatch forward); with gates, writes w_tk * dy_t into expert order and, in the same
  pass, the gate gradient <dy_t, o_tk> (combine backward).
- gather-sum (`_gather_sum`): y_t = sum_k w_tk * o[pos(t, k)] in float32 (combine forward);
  without gates, the sum of the K gradient copies of a token (dispatch backward).
  (Without the kernels: index_select, a batched product and a sum over K.)
- SwiGLU (`swiglu`): one Triton kernel forward (read h, u; write a) and one backward (read
  h, u, da; write dh, du), instead of five to seven eager element-wise kernels.
- gate and up in one operand (`expert_ffn`, on CUDA: [W_gate | W_up] concatenated per call):
  one grouped GEMM gives [h | u], SwiGLU reads both halves in place and writes [dh | du],
  so the input gradient is one grouped GEMM instead of two plus an addition of [A, H].

`expert_ffn` is the one local computation of the routed experts: `grouped_experts` (one
device) and the expert-parallel path (`moebench.model.moe`, after the all-to-all) both call
it. Weight shapes (one tensor per projection, experts stacked first): `w_gate_EHF`
[E, H, F], `w_up_EHF` [E, H, F], `w_down_EFH` [E, F, H]; x W means x @ W.

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
class ExpertPlan:
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


def plan_dispatch(experts_TK: torch.Tensor, num_experts: int) -> ExpertPlan:
    """Stable sort of the assignments by expert id (ties keep token order). No host sync:
    the counts are a scatter-add, not `bincount` (which reads the maximum id on the host)."""
    K = experts_TK.shape[1]
    flat_A = experts_TK.reshape(-1).long()
    order_A = torch.sort(flat_A, stable=True).indices
    pos_A = torch.empty_like(order_A)
    pos_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_A.device)
    counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A))
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return ExpertPlan(order_A, order_A // K, pos_A, offsets_E, counts_E)


@triton.jit
def _scatter_rows_kernel(
    src_ptr,
    pos_ptr,
    scale_ptr,
    other_ptr,
    dst_ptr,
    dot_ptr,
    H,
    K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCALE: tl.constexpr,
    DOT: tl.constexpr,
):
    """Token t: dst[pos[t, k]] = src[t] (* scale[t, k]); DOT: dot[t, k] = <src[t], other[pos]>."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    x = tl.load(src_ptr + t * H + cols, mask=cmask, other=0.0)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k)
        row = x
        if SCALE:
            row = (x.to(tl.float32) * tl.load(scale_ptr + t * K + k)).to(x.dtype)
        tl.store(dst_ptr + p * H + cols, row, mask=cmask)
        if DOT:
            o = tl.load(other_ptr + p * H + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(dot_ptr + t * K + k, tl.sum(x.to(tl.float32) * o, axis=0))


@triton.jit
def _gather_sum_kernel(
    src_ptr, w_ptr, pos_ptr, dst_ptr, H, K: tl.constexpr, BLOCK_H: tl.constexpr,
    WEIGHTED: tl.constexpr,
):  # fmt: skip
    """Token t: dst[t] = sum_k (w[t, k] *) src[pos[t, k]], accumulated in float32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k)
        row = tl.load(src_ptr + p * H + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += row * tl.load(w_ptr + t * K + k) if WEIGHTED else row
    tl.store(dst_ptr + t * H + cols, acc.to(dst_ptr.dtype.element_ty), mask=cmask)


def _row_launch(H: int) -> dict[str, int]:
    """One program per token row: the whole row in registers, 8-16 elements per thread."""
    block = triton.next_power_of_2(H)
    return {"BLOCK_H": block, "num_warps": max(1, min(16, block // 512))}


def _scatter_rows(
    src_TH: torch.Tensor,
    pos_A: torch.Tensor,
    scale_TK: torch.Tensor | None = None,
    other_AH: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dst [A, H] with dst[pos[t*K + k]] = src[t] (* scale[t, k]), and with `other` the
    gate gradient dot [T, K] = <src[t], other[pos[t*K + k]]> (float32)."""
    T, H = src_TH.shape
    K = pos_A.numel() // max(T, 1)
    src_TH = src_TH.contiguous()
    dst_AH = src_TH.new_empty(pos_A.numel(), H)
    dot_TK = None if other_AH is None else src_TH.new_empty(T, K, dtype=torch.float32)
    if T:
        _scatter_rows_kernel[(T,)](
            src_TH,
            pos_A,
            scale_TK if scale_TK is None else scale_TK.float().contiguous(),
            other_AH if other_AH is None else other_AH.contiguous(),
            dst_AH,
            dot_TK,
            H,
            K=K,
            SCALE=scale_TK is not None,
            DOT=other_AH is not None,
            **_row_launch(H),
        )
    return dst_AH, dot_TK


def _gather_sum(
    src_AH: torch.Tensor, pos_A: torch.Tensor, T: int, w_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """dst [T, H] (dtype of src) with dst[t] = sum_k (w[t, k] *) src[pos[t*K + k]]."""
    H = src_AH.shape[1]
    dst_TH = src_AH.new_empty(T, H)
    if T:
        _gather_sum_kernel[(T,)](
            src_AH.contiguous(),
            w_TK if w_TK is None else w_TK.float().contiguous(),
            pos_A,
            dst_TH,
            H,
            K=pos_A.numel() // T,
            WEIGHTED=w_TK is not None,
            **_row_launch(H),
        )
    return dst_TH


class _Dispatch(torch.autograd.Function):
    """xs[i] = x[token_A[i]]; backward sums the K copies of each token (no atomics)."""

    @staticmethod
    def forward(ctx, x_TH, token_A, pos_A, K, triton_kernels):  # type: ignore[override]
        ctx.save_for_backward(pos_A)
        ctx.T, ctx.K, ctx.triton_kernels = x_TH.shape[0], K, triton_kernels
        if triton_kernels:
            return _scatter_rows(x_TH, pos_A)[0]
        return x_TH.index_select(0, token_A)

    @staticmethod
    def backward(ctx, g_AH):  # type: ignore[override]
        (pos_A,) = ctx.saved_tensors
        T = ctx.T
        if ctx.triton_kernels:
            return _gather_sum(g_AH, pos_A, T), None, None, None, None
        g_TKH = g_AH.index_select(0, pos_A).view(T, ctx.K, g_AH.shape[1])
        acc = torch.promote_types(g_AH.dtype, torch.float32)  # float32 at least
        return g_TKH.sum(1, dtype=acc).to(g_AH.dtype), None, None, None, None


class _Combine(torch.autograd.Function):
    """y_t = sum_k w_tk * o[pos(t, k)]; backward: w_tk * dy_t back into expert order and the
    gate gradient <dy_t, o[pos(t, k)]>."""

    @staticmethod
    def forward(ctx, o_AH, weights_TK, pos_A, order_A, triton_kernels):  # type: ignore[override]
        T, K = weights_TK.shape
        ctx.save_for_backward(o_AH, weights_TK, pos_A, order_A)
        ctx.triton_kernels = triton_kernels
        if triton_kernels:
            return _gather_sum(o_AH, pos_A, T, weights_TK)
        o_TKH = o_AH.index_select(0, pos_A).view(T, K, o_AH.shape[1])
        return torch.bmm(weights_TK.to(o_AH.dtype).unsqueeze(1), o_TKH).squeeze(1)

    @staticmethod
    def backward(ctx, g_TH):  # type: ignore[override]
        o_AH, weights_TK, pos_A, order_A = ctx.saved_tensors
        T, K = weights_TK.shape
        need_o, need_w = ctx.needs_input_grad[:2]
        if ctx.triton_kernels:
            g_o, g_w = _scatter_rows(g_TH, pos_A, weights_TK, o_AH if need_w else None)
            g_w = g_w.to(weights_TK.dtype) if need_w else None
            return g_o, g_w, None, None, None
        g_o = g_w = None
        if need_o:
            g_TKH = weights_TK.to(g_TH.dtype).unsqueeze(2) * g_TH.unsqueeze(1)
            g_o = g_TKH.view(T * K, g_TH.shape[1]).index_select(0, order_A)
        if need_w:
            o_TKH = o_AH.index_select(0, pos_A).view(T, K, o_AH.shape[1])
            g_w = torch.bmm(o_TKH, g_TH.unsqueeze(2)).squeeze(2).to(weights_TK.dtype)
        return g_o, g_w, None, None, None


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr, u_ptr, a_ptr, rows, F, stride, BR: tl.constexpr, BC: tl.constexpr
):  # fmt: skip
    """a[r, c] = silu(h[r, c]) * u[r, c]; h and u rows `stride` apart, a contiguous [rows, F]."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    c = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    mask = (r < rows) & (c < F)
    h = tl.load(h_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    a = h / (1.0 + tl.exp(-h)) * u
    tl.store(a_ptr + r * F + c, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, u_ptr, da_ptr, dh_ptr, du_ptr, rows, F, stride, BR: tl.constexpr, BC: tl.constexpr
):  # fmt: skip
    """dh, du of a = silu(h) * u; h, u, dh, du rows `stride` apart, da contiguous [rows, F]."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)[:, None]
    c = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    mask = (r < rows) & (c < F)
    h = tl.load(h_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + r * F + c, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-h))
    dh = da * u * sig * (1.0 + h * (1.0 - sig))
    tl.store(dh_ptr + r * stride + c, dh.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r * stride + c, (da * h * sig).to(du_ptr.dtype.element_ty), mask=mask)


def _swiglu_grid(rows: int, F: int) -> tuple[tuple[int, int], dict[str, int]]:
    """2048 elements per program: BC columns (at most 1024) by BR rows."""
    BC = min(1024, triton.next_power_of_2(F))
    BR = 2048 // BC
    return (triton.cdiv(rows, BR), triton.cdiv(F, BC)), {"BR": BR, "BC": BC}


def _swiglu_fwd(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(h) * u of two [rows, F] views with a common row stride (contiguous columns)."""
    rows, F = h.shape
    a = h.new_empty(rows, F)
    if a.numel():
        grid, blocks = _swiglu_grid(rows, F)
        _swiglu_fwd_kernel[grid](h, u, a, rows, F, h.stride(0), **blocks)
    return a


def _swiglu_bwd(h, u, da, dh, du) -> None:
    """Writes dh, du (views with h's row stride) from h, u and the contiguous da."""
    rows, F = h.shape
    if rows and F:
        grid, blocks = _swiglu_grid(rows, F)
        _swiglu_bwd_kernel[grid](h, u, da.contiguous(), dh, du, rows, F, h.stride(0), **blocks)


class _SwiGLU(torch.autograd.Function):
    """silu(h) * u (equal shapes, run as [rows, last dim]) with one Triton kernel each way
    (float32 math, storage in h's dtype)."""

    @staticmethod
    def forward(ctx, h, u):  # type: ignore[override]
        shape = h.shape
        h, u = (t.contiguous().view(-1, shape[-1]) for t in (h, u))
        ctx.save_for_backward(h, u)
        return _swiglu_fwd(h, u).view(shape)

    @staticmethod
    def backward(ctx, da):  # type: ignore[override]
        h, u = ctx.saved_tensors
        dh, du = torch.empty_like(h), torch.empty_like(u)
        _swiglu_bwd(h, u, da.reshape(h.shape), dh, du)
        return dh.view(da.shape), du.view(da.shape)


class _SwiGLUPacked(torch.autograd.Function):
    """silu(h) * u of hu = [h | u] ([rows, 2F]) read in place; the gradient is [dh | du]."""

    @staticmethod
    def forward(ctx, hu):  # type: ignore[override]
        hu = hu.contiguous()
        ctx.save_for_backward(hu)
        F = hu.shape[1] // 2
        return _swiglu_fwd(hu[:, :F], hu[:, F:])

    @staticmethod
    def backward(ctx, da):  # type: ignore[override]
        (hu,) = ctx.saved_tensors
        F = hu.shape[1] // 2
        dhu = torch.empty_like(hu)
        _swiglu_bwd(hu[:, :F], hu[:, F:], da, dhu[:, :F], dhu[:, F:])
        return dhu


def swiglu(h: torch.Tensor, u: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """silu(h) * u of [rows, F] tensors; the Triton kernels run when `fused` (default: on
    CUDA tensors)."""
    if fused is None:
        fused = h.is_cuda
    return _SwiGLU.apply(h, u) if fused else F.silu(h) * u


def swiglu_packed(hu: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """silu(h) * u of hu = [h | u] ([rows, 2F]); the Triton kernels when `fused` (default: on
    CUDA tensors)."""
    if fused is None:
        fused = hu.is_cuda
    if fused:
        return _SwiGLUPacked.apply(hu)
    h, u = hu.chunk(2, dim=1)
    return F.silu(h) * u


def _grouped_mm_native(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these operands: CUDA bf16 on sm90+ only (on CPU its
    backward failed for some shapes in torch 2.13, and the segment loop is deterministic)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
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
    parts = [a_AX[bounds[e] : bounds[e + 1]] @ b_EXY[e]
             for e in range(b_EXY.shape[0]) if bounds[e + 1] > bounds[e]]
    return torch.cat(parts, 0) if parts else a_AX.new_zeros(0, b_EXY.shape[-1])


def expert_ffn(
    xs_AH: torch.Tensor,
    offsets_E: torch.Tensor,
    w_gate_EHF: torch.Tensor,
    w_up_EHF: torch.Tensor,
    w_down_EFH: torch.Tensor,
    fused: bool | None = None,
) -> torch.Tensor:
    """The routed experts' local computation on rows sorted by expert (rows of expert e end
    at `offsets_E[e]`): (silu(x W_gate[e]) * x W_up[e]) W_down[e]. One function for one GPU,
    for CPU and for the rows an expert-parallel rank receives.

    `fused` (default: on CUDA): gate and up packed into one [E, H, 2F] operand, one grouped
    GEMM for both, the Triton SwiGLU reading [h | u] in place; else one matmul per segment.
    Every row belongs to an expert: `offsets_E[-1]` is the row count."""
    if fused is None:
        fused = xs_AH.is_cuda
    if fused:
        hu_A2F = grouped_mm(xs_AH, torch.cat((w_gate_EHF, w_up_EHF), dim=2), offsets_E)
        return grouped_mm(swiglu_packed(hu_A2F, fused=True), w_down_EFH, offsets_E)
    h_AF = grouped_mm(xs_AH, w_gate_EHF, offsets_E)
    u_AF = grouped_mm(xs_AH, w_up_EHF, offsets_E)
    return grouped_mm(swiglu(h_AF, u_AF, fused=False), w_down_EFH, offsets_E)


def _check_shapes(x_TH, experts_TK, weights_TK, weights: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first argument whose shape disagrees with x [T, H], the
    experts [T, K] and the first weight stack's expert count E and width F."""
    T, H = x_TH.shape
    first = next(iter(weights.values()))
    E, Fh = first.shape[0], first.shape[2]
    K = experts_TK.shape[-1]
    allowed = {
        "experts_TK": (T, K),
        "weights_TK": (T, K),
        "w_gate_EHF": (E, H, Fh),
        "w_up_EHF": (E, H, Fh),
        "w_down_EFH": (E, Fh, H),
    }
    tensors = {"experts_TK": experts_TK, "weights_TK": weights_TK, **weights}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != allowed[name]:
            raise ValueError(
                f"{name} shape={tuple(tensor.shape)} is invalid; allowed: {allowed[name]}"
            )


def grouped_experts(
    x_TH: torch.Tensor,
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_EHF: torch.Tensor,
    w_up_EHF: torch.Tensor,
    w_down_EFH: torch.Tensor,
    triton_kernels: bool | None = None,
) -> torch.Tensor:
    """Routed-expert output y [T, H] (dtype of x): sum_k w_tk SwiGLU-FFN_{e_tk}(x_t).

    Differentiable w.r.t. x, the gates and the three weight stacks. `experts_TK` int64 in
    [0, E); gates enter in float32 (the combine accumulates in float32). `triton_kernels`:
    Triton row movement, packed gate/up GEMM and SwiGLU (`expert_ffn`; default: on CUDA;
    the interpreter runs them on CPU). No host sync on CUDA.
    """
    _check_shapes(
        x_TH,
        experts_TK,
        weights_TK,
        {"w_gate_EHF": w_gate_EHF, "w_up_EHF": w_up_EHF, "w_down_EFH": w_down_EFH},
    )
    if triton_kernels is None:
        triton_kernels = x_TH.is_cuda
    plan = plan_dispatch(experts_TK, w_gate_EHF.shape[0])
    xs_AH = dispatch_rows(x_TH, plan, triton_kernels)
    o_AH = expert_ffn(xs_AH, plan.offsets, w_gate_EHF, w_up_EHF, w_down_EFH, triton_kernels)
    return combine_rows(o_AH, weights_TK, plan, triton_kernels)


def dispatch_rows(x_TH: torch.Tensor, plan: ExpertPlan, triton_kernels: bool) -> torch.Tensor:
    """[A, H]: the K copies of every row of x in the plan's order (the dispatch permute);
    differentiable, backward sums the copies without atomics. No rows (a rank that received
    none): the torch path."""
    K = plan.pos.numel() // max(x_TH.shape[0], 1)
    return _Dispatch.apply(x_TH, plan.token, plan.pos, K, triton_kernels and x_TH.shape[0] > 0)


def combine_rows(o_AH: torch.Tensor, weights_TK: torch.Tensor, plan: ExpertPlan,
                 triton_kernels: bool) -> torch.Tensor:
    """[T, H]: y_t = sum_k w_tk o[pos(t, k)], accumulated in float32 (the combine unpermute);
    differentiable w.r.t. o and the gates. No rows: the torch path."""
    return _Combine.apply(o_AH, weights_TK, plan.pos, plan.order,
                          triton_kernels and weights_TK.shape[0] > 0)


def permute_rows(x_NH: torch.Tensor, perm_N: torch.Tensor, inverse_N: torch.Tensor,
                 triton_kernels: bool | None = None) -> torch.Tensor:
    """x[perm] whose backward is the inverse gather g[inverse] (no atomics): `_Dispatch`
    with one slot per row. `inverse_N` is the inverse permutation of `perm_N`."""
    if triton_kernels is None:
        triton_kernels = x_NH.is_cuda
    return _Dispatch.apply(x_NH, perm_N, inverse_N, 1, triton_kernels)


def expert_loop(
    x_TH: torch.Tensor,
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    w_gate_EHF: torch.Tensor,
    w_up_EHF: torch.Tensor,
    w_down_EFH: torch.Tensor,
) -> torch.Tensor:
    """Per-expert loop reference of `grouped_experts` (same math, one expert at a time)."""
    _check_shapes(
        x_TH,
        experts_TK,
        weights_TK,
        {"w_gate_EHF": w_gate_EHF, "w_up_EHF": w_up_EHF, "w_down_EFH": w_down_EFH},
    )
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
