"""Grouped expert path (moebench.kernels.experts) against the per-expert loop reference on
CPU: outputs and the gradients of x, gates and all three weight stacks, with the torch row
movement and with the Triton kernels (interpreter), separate and packed gate/up weights;
dispatch plan invariants; the Triton SwiGLU kernels and the grouped-GEMM fallback.

Legend: T tokens, K experts per token, A = T*K assignments, E experts, H hidden, F expert
hidden.
"""

from __future__ import annotations

import functools

import pytest
import torch

from moebench.kernels import experts as ex
from moebench.kernels.experts import (
    expert_ffn,
    expert_loop,
    grouped_experts,
    permute_rows,
    plan_dispatch,
    swiglu,
    swiglu_packed,
)

# relative L2 error bound of outputs and gradients, by dtype
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _problem(T, H, Fh, E, K, dtype, seed=0, empty_expert=True):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=gen)
    if empty_expert:
        scores[:, E - 1] = -1.0  # expert E-1 gets no token: a zero-size group
    experts = scores.topk(K, dim=1).indices
    weights = torch.rand(T, K, generator=gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    ws = [
        (torch.randn(*shape, generator=gen) / shape[1] ** 0.5).to(dtype)
        for shape in ((E, H, Fh), (E, H, Fh), (E, Fh, H))
    ]
    return x, experts, weights, ws, torch.randn(T, H, generator=gen).to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "H", "Fh", "E", "K"), [(1, 8, 16, 4, 1), (61, 32, 16, 8, 3)])
@pytest.mark.parametrize("triton_kernels", [False, True])
def test_grouped_experts_match_loop(T, H, Fh, E, K, dtype, triton_kernels):
    """triton_kernels=True is the CUDA path: Triton row movement and gate/up packed into one
    grouped GEMM with the packed SwiGLU kernel (`expert_ffn`)."""
    x, experts, weights, ws, dy = _problem(T, H, Fh, E, K, dtype)
    outs = []
    for fn in (functools.partial(grouped_experts, triton_kernels=triton_kernels), expert_loop):
        leaves = [t.clone().requires_grad_() for t in (x, weights, *ws)]
        y = fn(leaves[0], experts, *leaves[1:])
        outs.append((y, *torch.autograd.grad(y, leaves, dy)))
    for name, a, b in zip(("y", "dx", "dw", "dgate", "dup", "ddown"), *outs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel(a, b) < REL[dtype], name


@pytest.mark.parametrize("fused", [False, True])
def test_expert_ffn_packed_and_split_paths_equal_the_segment_formula(fused):
    x, _, _, ws, _ = _problem(14, 8, 16, 4, 1, torch.float32)
    offsets = torch.tensor([3, 3, 9, 14], dtype=torch.int32)
    y = expert_ffn(x, offsets, *ws, fused=fused)
    assert y.shape == (14, 8)
    for e, (lo, hi) in enumerate([(0, 3), (3, 3), (3, 9), (9, 14)]):
        want = (torch.nn.functional.silu(x[lo:hi] @ ws[0][e]) * (x[lo:hi] @ ws[1][e])) @ ws[2][e]
        torch.testing.assert_close(y[lo:hi], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("triton_kernels", [False, True])
def test_permute_rows_backward_is_the_inverse_gather(triton_kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, generator=gen).requires_grad_()
    perm = torch.randperm(7, generator=gen)
    inverse = torch.argsort(perm)
    y = permute_rows(x, perm, inverse, triton_kernels)
    torch.testing.assert_close(y, x[perm])
    g = torch.randn(7, 5, generator=gen)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, g[inverse])


def test_plan_dispatch_is_a_stable_sort_by_expert():
    experts = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    plan = plan_dispatch(experts, num_experts=4)
    assert plan.counts.tolist() == [3, 2, 3, 0]
    assert plan.offsets.tolist() == [3, 5, 8, 8] and plan.offsets.dtype == torch.int32
    flat = experts.flatten()
    assert flat[plan.order].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.token.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]  # tokens ascending per expert
    assert torch.equal(plan.order[plan.pos], torch.arange(8))  # pos inverts order


def test_swiglu_kernel_matches_eager():
    gen = torch.Generator().manual_seed(1)
    h, u = (torch.randn(3000, generator=gen).requires_grad_() for _ in range(2))
    da = torch.randn(3000, generator=gen)
    fused = swiglu(h, u, fused=True)
    eager = swiglu(h, u, fused=False)
    torch.testing.assert_close(fused, eager)
    for a, b in zip(
        torch.autograd.grad(fused, [h, u], da),
        torch.autograd.grad(eager, [h, u], da),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_packed_swiglu_kernel_matches_eager():
    gen = torch.Generator().manual_seed(4)
    hu = torch.randn(37, 2 * 24, generator=gen).requires_grad_()
    da = torch.randn(37, 24, generator=gen)
    fused, eager = swiglu_packed(hu, fused=True), swiglu_packed(hu, fused=False)
    torch.testing.assert_close(fused, eager)
    (g_fused,) = torch.autograd.grad(fused, hu, da)
    (g_eager,) = torch.autograd.grad(eager, hu, da)
    torch.testing.assert_close(g_fused, g_eager)


def test_grouped_mm_fallback_equals_native(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(10, 8, generator=gen)
    b = torch.randn(3, 8, 4, generator=gen)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    native = ex.grouped_mm(a, b, offsets)
    monkeypatch.setattr(ex, "_grouped_mm_native", lambda *_: False)
    loop = ex.grouped_mm(a, b, offsets)
    torch.testing.assert_close(native, loop)
    torch.testing.assert_close(loop[:4], a[:4] @ b[0])
    torch.testing.assert_close(loop[4:], a[4:] @ b[2])


def test_shape_errors_name_the_argument():
    x, experts, weights, ws, _ = _problem(5, 8, 16, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"w_down_EFH shape=\(4, 8, 16\)"):
        grouped_experts(x, experts, weights, ws[0], ws[1], ws[2].transpose(1, 2))
    with pytest.raises(ValueError, match=r"weights_TK shape=\(5, 3\)"):
        grouped_experts(x, experts, torch.rand(5, 3), *ws)
    with pytest.raises(ValueError, match=r"w_up_EHF shape=\(4, 8, 31\)"):
        grouped_experts(x, experts, weights, ws[0], torch.zeros(4, 8, 31), ws[2])
