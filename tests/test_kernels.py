"""Fused Triton router (moebench.kernels.router) against the PyTorch reference
`moebench.routing.route`, run on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET).

Ids are compared as sets and the kernel's order checked to be descending in the key (the
reference's order; equal to it exactly where keys are exactly tied or far apart), gates and
logit gradients within the dtype-aware tolerance table `TOL`, the load histogram exactly.
The grid covers tokens 1..4096, E in {8, 64, 160, 256}, K in {1, 2, 6, 8}, groups in
{1, 4, 8}, every group rule, no / small / large negative bias, both score functions and
float32 / bfloat16 logits pairwise (every pair of values of two axes appears in some case)
rather than as a full product, to keep the interpreter's time in budget. Logits are
tie-free by construction: rows whose float64 keys are within `GAP` of a selection boundary
are redrawn. Exact ties and keys a few ulps apart (which the packed-key fast path cannot
order and hands to the exact path) are tested separately against the reference's order.

Legend: T tokens, E routed experts, K experts per token, G groups, M group limit.
"""

from __future__ import annotations

import pytest
import torch

from moebench.kernels import router as kr
from moebench.kernels.router import (
    Launch,
    route_fused,
    router_backward,
    router_forward,
    supports,
)
from moebench.routing import (
    RouterConfig,
    preset,
    route,
    scores,
    select_experts,
    selection_key,
)

# Gradient tolerances by logits dtype (the gradient is stored in that dtype); the gates are
# always float32 and are compared with the float32 row, scaled by route_scale.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
}
GAP = 1e-4  # minimum relative float64 gap at every selection boundary of a test row

# (T, E, K, G, M, group_score, score_fn, bias, normalize, route_scale, dtype)
GRID = [
    (1, 8, 1, 1, 1, "max", "softmax", "none", False, 1.0, torch.float32),
    (37, 8, 2, 4, 2, "max", "sigmoid", "small", True, 1.0, torch.bfloat16),
    (100, 8, 6, 4, 3, "topk_sum", "softmax", "large_neg", False, 2.0, torch.float32),
    (257, 64, 6, 1, 1, "max", "sigmoid", "large_neg", True, 2.5, torch.bfloat16),
    (64, 64, 1, 8, 4, "top2_sum", "softmax", "small", False, 1.0, torch.float32),
    (513, 64, 8, 4, 2, "topk_sum", "sigmoid", "none", True, 1.0, torch.float32),
    (300, 64, 2, 8, 1, "max", "sigmoid", "large_neg", False, 1.0, torch.bfloat16),
    (129, 160, 6, 8, 3, "max", "softmax", "none", False, 16.0, torch.float32),
    (200, 160, 8, 4, 2, "top2_sum", "sigmoid", "large_neg", True, 2.5, torch.float32),
    (77, 160, 1, 1, 1, "max", "sigmoid", "small", False, 1.0, torch.bfloat16),
    (1000, 160, 2, 8, 2, "topk_sum", "softmax", "small", True, 1.0, torch.bfloat16),
    pytest.param(
        (4096, 256, 8, 8, 4, "top2_sum", "sigmoid", "small", True, 2.5, torch.float32),
        marks=pytest.mark.slow,
        id="v3-4096",
    ),
    (150, 256, 6, 4, 2, "max", "softmax", "large_neg", False, 1.0, torch.bfloat16),
    (333, 256, 1, 8, 2, "max", "softmax", "none", True, 1.0, torch.float32),
    (50, 256, 2, 1, 1, "max", "softmax", "large_neg", True, 1.0, torch.float32),
    (90, 256, 8, 8, 4, "topk_sum", "sigmoid", "large_neg", True, 2.5, torch.bfloat16),
    (45, 8, 8, 1, 1, "max", "sigmoid", "none", False, 1.0, torch.float32),
    (400, 64, 6, 8, 4, "top2_sum", "softmax", "large_neg", True, 1.0, torch.bfloat16),
]


def _bias(kind: str, E: int, gen: torch.Generator) -> torch.Tensor | None:
    """No bias, a small one (|b| ~ 0.05), or a large negative one on a quarter of the
    experts (-50 and below: those win only where nothing else is left)."""
    if kind == "none":
        return None
    bias = 0.05 * torch.randn(E, generator=gen)
    if kind == "large_neg":
        hit = torch.randperm(E, generator=gen)[: max(1, E // 4)]
        bias[hit] = -50.0 - 10.0 * torch.rand(hit.numel(), generator=gen)
    return bias


def _near_tie(x: torch.Tensor, k: int) -> torch.Tensor:
    """bool [rows]: the k-th and (k+1)-th largest of each row are within GAP (relative)."""
    if k >= x.shape[1]:
        return torch.zeros(x.shape[0], dtype=torch.bool)
    top = x.topk(k + 1, dim=1).values
    a, b = top[:, k - 1], top[:, k]
    finite = torch.isfinite(b)
    scale = a.abs().clamp_min(1.0)
    return finite & ((a - b) <= GAP * scale)


def _ambiguous_rows(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None):
    """Rows whose selection depends on a float64 near-tie (group or expert boundary)."""
    z = logits.double()
    s = z.softmax(1) if cfg.score_fn == "softmax" else z.sigmoid()
    key = s
    if bias is not None:
        key = s * bias.double() if cfg.bias_mode == "mul" else s + bias.double()
    bad = torch.zeros(z.shape[0], dtype=torch.bool)
    if cfg.group_limited:
        grouped = key.view(z.shape[0], cfg.num_groups, -1)
        gscore = grouped.topk(cfg.group_topk, dim=2).values.sum(2)
        bad |= _near_tie(gscore, cfg.group_limit)
        for q in range(1, cfg.group_topk + 1):  # top-q sums need clean order inside groups
            bad |= (
                _near_tie(grouped.reshape(-1, grouped.shape[2]), q).view(-1, cfg.num_groups).any(1)
            )
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, gscore.topk(cfg.group_limit, dim=1).indices, True)
        key = key.masked_fill(~keep.repeat_interleave(cfg.experts_per_group, 1), float("-inf"))
    return bad | _near_tie(key, cfg.top_k)


def tie_free_logits(T, cfg, bias, dtype, gen) -> torch.Tensor:
    """Random logits (std 2) in `dtype` with every ambiguous row redrawn."""
    logits = (2 * torch.randn(T, cfg.num_experts, generator=gen)).to(dtype)
    for _ in range(50):
        bad = _ambiguous_rows(logits, cfg, bias)
        if not bad.any():
            return logits
        fresh = 2 * torch.randn(int(bad.sum()), cfg.num_experts, generator=gen)
        logits[bad] = fresh.to(dtype)
    raise AssertionError("could not draw tie-free logits")


def _descending(experts: torch.Tensor, logits, cfg: RouterConfig, bias) -> bool:
    """The experts of every token come in non-increasing key order (to float32 rounding)."""
    key = selection_key(scores(logits.detach(), cfg.score_fn), bias, cfg).gather(1, experts)
    return bool((key[:, 1:] <= key[:, :-1] + 1e-6 * key[:, :-1].abs().clamp_min(1.0)).all())


def _aligned(experts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Values reordered so that their experts are ascending (compare regardless of order)."""
    return values.gather(1, experts.argsort(1))


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(map(str, c[:10])))
def test_fused_router_matches_reference(case):
    T, E, K, G, M, rule, score_fn, bias_kind, normalize, scale, dtype = case
    cfg = RouterConfig(
        num_experts=E,
        top_k=K,
        score_fn=score_fn,
        num_groups=G,
        group_limit=M,
        group_score=rule,
        normalize=normalize,
        route_scale=scale,
    )
    gen = torch.Generator().manual_seed(hash(case[:10]) % 2**31)
    bias = _bias(bias_kind, E, gen)
    logits = tie_free_logits(T, cfg, bias, dtype, gen).requires_grad_()
    fused = route_fused(logits, cfg, bias)
    ref = route(logits, cfg, bias)

    assert fused.experts.dtype == torch.int64 and fused.weights.dtype == torch.float32
    assert torch.equal(fused.experts.sort(1).values, ref.experts.sort(1).values)
    assert _descending(fused.experts, logits, cfg, bias)
    assert torch.equal(fused.load, torch.bincount(ref.experts.flatten(), minlength=E))
    w_f, w_r = _aligned(fused.experts, fused.weights), _aligned(ref.experts, ref.weights)
    tol = TOL[torch.float32]
    torch.testing.assert_close(w_f, w_r, rtol=tol["rtol"], atol=tol["atol"] * scale)

    g = torch.randn(T, K, generator=gen)
    (grad_f,) = torch.autograd.grad((w_f * g).sum(), logits)
    (grad_r,) = torch.autograd.grad((w_r * g).sum(), logits)
    assert grad_f.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(
        grad_f.float(), grad_r.float(), rtol=tol["rtol"], atol=tol["atol"] * scale
    )


@pytest.mark.parametrize("name", ["v3", "v2", "v2-lite", "switch"])
def test_exact_ties_go_to_the_lower_index(name):
    """Integer logits and biases make many exact ties; selection equals the reference's
    (lower index wins, for groups and experts) and the tile takes the exact path."""
    cfg = preset(name)
    gen = torch.Generator().manual_seed(7)
    logits = torch.randint(-2, 3, (300, cfg.num_experts), generator=gen).float()
    bias = (
        torch.randint(-1, 2, (cfg.num_experts,), generator=gen).float() / 8
        if name == "v3"
        else None
    )
    fused = route_fused(logits, cfg, bias)
    ref = route(logits, cfg, bias)
    assert torch.equal(fused.experts, ref.experts)  # same order: ties by ascending id
    torch.testing.assert_close(fused.weights, ref.weights)


def test_keys_ulps_apart_take_the_exact_path():
    """Keys that differ only in the bits the packed keys drop (a few ulps) or not at all:
    the selection and its order equal the reference's exactly. Zero logits make s = 1/2
    exactly (no rounding difference to the reference's sigmoid), so the bias alone orders."""
    cfg = preset("v3")
    gen = torch.Generator().manual_seed(11)
    bias = 0.01 * torch.randperm(256, generator=gen).float()
    for i in range(0, 256, 2):  # pairs one to three ulps apart, or equal
        bias[i + 1] = bias[i] + torch.randint(0, 4, (), generator=gen) * 2**-22
    logits = torch.zeros(5, 256)
    fused = route_fused(logits, cfg, bias)
    ref = route(logits, cfg, bias)
    assert torch.equal(fused.experts, ref.experts)
    torch.testing.assert_close(fused.weights, ref.weights)


def test_gpu_variants_in_the_interpreter(monkeypatch):
    """The GPU's tuple top-2 reduction and the atomic load count give the same result."""
    cfg = preset("v3")
    gen = torch.Generator().manual_seed(13)
    bias = 0.05 * torch.randn(256, generator=gen)
    logits = tie_free_logits(12, cfg, bias, torch.float32, gen)
    ref = route(logits, cfg, bias)
    monkeypatch.setattr(kr, "TUPLE_TOP2", True)
    experts, weights, load = router_forward(logits, cfg, bias, Launch(num_warps=4))
    assert torch.equal(experts, ref.experts)
    torch.testing.assert_close(weights, ref.weights)
    monkeypatch.setattr(kr, "TUPLE_TOP2", False)
    atomic = router_forward(logits, cfg, bias, Launch(num_warps=4, atomic_load=True))
    assert torch.equal(atomic[0], experts) and torch.equal(atomic[2], load)
    assert torch.equal(load, torch.bincount(ref.experts.flatten(), minlength=256))


def test_multiplicative_bias_matches_reference():
    cfg = preset("wang", bias_mode="mul", normalize=True)
    gen = torch.Generator().manual_seed(3)
    bias = 1.0 + 0.2 * torch.randn(cfg.num_experts, generator=gen)
    logits = tie_free_logits(200, cfg, bias, torch.float32, gen)
    fused = route_fused(logits, cfg, bias)
    ref = route(logits, cfg, bias)
    assert torch.equal(fused.experts, ref.experts)
    torch.testing.assert_close(fused.weights, ref.weights)


def test_launch_shapes_agree():
    """Rows per program, lanes per row and program count change nothing but rounding
    (persistent loop, tail tiles)."""
    cfg = preset("v2")
    gen = torch.Generator().manual_seed(5)
    logits = tie_free_logits(70, cfg, None, torch.float32, gen)
    base = router_forward(logits, cfg, None, Launch(num_warps=16))
    other = router_forward(logits, cfg, None, Launch(num_warps=1, lanes_per_row=16))
    assert torch.equal(base[0], other[0]) and torch.equal(base[2], other[2])
    torch.testing.assert_close(base[1], other[1])  # softmax sums differ in summation order
    g = torch.randn(70, cfg.top_k, generator=gen)
    torch.testing.assert_close(
        router_backward(logits, base[0], g, cfg, Launch(block_t=64)),
        router_backward(logits, base[0], g, cfg, Launch(block_t=2)),
    )


def test_zero_tokens():
    cfg = preset("v3")
    out = route_fused(torch.empty(0, 256), cfg, torch.zeros(256))
    assert out.experts.shape == (0, 8) and out.weights.shape == (0, 8)
    assert torch.equal(out.load, torch.zeros(256, dtype=torch.int64))


def test_supports_and_errors():
    cfg = preset("v3")
    assert supports(cfg, torch.zeros(4, 256))
    assert supports(cfg, torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(256))
    assert not supports(cfg, torch.zeros(4, 128))
    assert not supports(cfg, torch.zeros(4, 256, dtype=torch.float64))
    assert not supports(cfg, torch.zeros(4, 256), torch.zeros(3))
    with pytest.raises(ValueError, match=r"logits_TE shape=\(4, 128\)"):
        route_fused(torch.zeros(4, 128), cfg)
    with pytest.raises(ValueError, match=r"logits_TE dtype=torch\.float64"):
        route_fused(torch.zeros(4, 256, dtype=torch.float64), cfg)
    with pytest.raises(ValueError, match=r"bias_E shape=\(3,\)"):
        route_fused(torch.zeros(4, 256), cfg, torch.zeros(3))
    wide = RouterConfig(num_experts=64, top_k=33, score_fn="softmax")
    assert not supports(wide, torch.zeros(4, 64))
    with pytest.raises(ValueError, match=r"top_k=33 is invalid for the fused router"):
        route_fused(torch.zeros(4, 64), wide)
    many = RouterConfig(
        num_experts=128, top_k=2, score_fn="softmax", num_groups=64, group_limit=1
    )
    assert not supports(many, torch.zeros(4, 128))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_route_dispatches_to_the_kernel_on_cuda():
    cfg = preset("v3")
    logits = torch.randn(1000, 256, device="cuda")
    bias = 0.05 * torch.randn(256, device="cuda")
    out = route(logits, cfg, bias)
    s = scores(logits, cfg.score_fn)
    ref = select_experts(selection_key(s, bias, cfg), cfg)  # the reference, same device
    assert torch.equal(out.experts.sort(1).values, ref.sort(1).values)
    assert _descending(out.experts, logits, cfg, bias)
