"""Fused Triton router: one pass over the logits computes the scores, bias, group limit, top-K,
gates and the per-expert load histogram; a second kernel gives the gates' logit gradient.

Semantics are exactly `moebench.routing.route` (routing.md §7):

    s      = softmax(z) | sigmoid(z)                      float32 ([V2] eq. 22, [V3] eq. 15)
    key    = s + b | s * b                                ([V3] eq. 16, [LF] §4.3)
    groups ranked by max / top-2 sum / top-(K//M) sum of key; keep M; others -inf
    sel    = top-K of key;  w = route_scale * s[sel] (/ sum s[sel] if normalize)

How the selection stays cheap (the peers.md anchor: one argmax per round per row is
arithmetic bound at 6x the HBM floor): each program holds a tile of BLOCK_T rows x E experts
in registers and finds the K-th largest key by K rounds of one row-wise max each
("largest key below the previous maximum"), with no argmax and no index bookkeeping. The
selected set is then `key >= threshold`, and a cumulative sum over the row places each
selected expert in its output slot. Only if some row of the tile holds an exact tie at the
threshold (the count of `key >= threshold` exceeds K) does the tile take the exact path:
rounds that also count multiplicities, then the lowest indices among the tied keys win.

Conventions (identical to the reference):
- Ties: the lower expert index wins, both for groups and for experts.
- Output order: the K experts of a token come in ascending expert id (the reference orders
  by descending key; the contract compares them as sets, weights stay aligned).
- Normalization has no epsilon; the sum is clamped to the smallest normal float32.
- The load histogram counts every selected (token, expert) pair (int64 [E]).

Legend: T tokens, E routed experts, K experts per token, G groups, EG experts per group,
GP / EGP / EP: G, EG, E padded to powers of two (Triton tile sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebench.routing import RouterConfig

MAX_EXPERTS = 1024
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_max(x):
    """Max over the last two axes of a [BT, GP, EGP] tile -> [BT]."""
    return tl.max(tl.max(x, axis=2), axis=1)


@triton.jit
def _row_count(mask):
    """Number of true entries over the last two axes of a [BT, GP, EGP] tile -> int32 [BT]."""
    return tl.sum(tl.sum(mask.to(tl.int32), axis=2), axis=1)


@triton.jit
def _row_cumsum(x):
    """Inclusive cumulative sum of an int32 [BT, GP, EGP] tile in flattened (expert id) order."""
    inner = tl.cumsum(x, axis=2)
    per_group = tl.sum(x, axis=2)
    before = tl.cumsum(per_group, axis=1) - per_group
    return inner + before[:, :, None]


@triton.jit
def _group_topq_sum(key, Q: tl.constexpr):
    """Sum of the Q largest keys of each group, ties counted with multiplicity -> [BT, GP]."""
    prev = tl.full([key.shape[0], key.shape[1]], float("inf"), tl.float32)
    taken = tl.zeros([key.shape[0], key.shape[1]], tl.int32)
    total = tl.zeros([key.shape[0], key.shape[1]], tl.float32)
    for _ in tl.static_range(Q):
        m = tl.max(tl.where(key < prev[:, :, None], key, float("-inf")), axis=2)
        count = tl.sum((key == m[:, :, None]).to(tl.int32), axis=2)
        take = tl.minimum(count, Q - taken)
        total += tl.where(take > 0, m, 0.0) * take.to(tl.float32)
        taken += take
        prev = m
    return total


@triton.jit
def _router_fwd_kernel(
    logits_ptr,
    bias_ptr,
    experts_ptr,
    weights_ptr,
    load_ptr,
    T,
    num_tiles,
    route_scale,
    E: tl.constexpr,
    K: tl.constexpr,
    G: tl.constexpr,
    EG: tl.constexpr,
    GP: tl.constexpr,
    EGP: tl.constexpr,
    M: tl.constexpr,
    Q: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_MUL: tl.constexpr,
    GROUP_LIMITED: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    g = tl.arange(0, GP)
    j = tl.arange(0, EGP)
    col_GE = g[:, None] * EG + j[None, :]  # expert id of every tile position
    valid_GE = (g[:, None] < G) & (j[None, :] < EG)
    if HAS_BIAS:
        bias_GE = tl.load(bias_ptr + col_GE, mask=valid_GE, other=0.0).to(tl.float32)
    hist = tl.zeros([BLOCK_T, GP, EGP], tl.int32)  # summed over rows once, after the loop
    gidx = tl.zeros([BLOCK_T, GP], tl.int32) + g[None, :]
    rt = tl.arange(0, BLOCK_T)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_T + rt
        rmask = rows < T
        m3 = rmask[:, None, None] & valid_GE[None, :, :]
        z = tl.load(
            logits_ptr + rows.to(tl.int64)[:, None, None] * E + col_GE[None, :, :],
            mask=m3,
            other=float("-inf"),
        ).to(tl.float32)
        if SOFTMAX:
            zmax = tl.where(rmask, _row_max(z), 0.0)
            ex = tl.exp(z - zmax[:, None, None])
            den = tl.sum(tl.sum(ex, axis=2), axis=1)
            den = tl.where(rmask, den, 1.0)
            s = ex / den[:, None, None]
        else:
            s = 1.0 / (1.0 + tl.exp(-z))
        key = s
        if HAS_BIAS:
            key = s * bias_GE[None, :, :] if BIAS_MUL else s + bias_GE[None, :, :]
        key = tl.where(m3, key, float("-inf"))

        if GROUP_LIMITED:
            # Group score, then the M best groups (lower index wins ties); others -> -inf.
            gscore = tl.max(key, axis=2) if Q == 1 else _group_topq_sum(key, Q)
            gscore = tl.where(gidx < G, gscore, float("-inf"))
            keep = gidx < 0
            for _ in tl.static_range(M):
                best = tl.max(gscore, axis=1)
                first = tl.min(tl.where(gscore == best[:, None], gidx, GP), axis=1)
                hit = gidx == first[:, None]
                keep = keep | hit
                gscore = tl.where(hit, float("-inf"), gscore)
            key = tl.where(keep[:, :, None], key, float("-inf"))

        # Fast path: the K-th largest distinct key, one row-wise max per round.
        thr = tl.full([BLOCK_T], float("inf"), tl.float32)
        for _ in tl.static_range(K):
            thr = _row_max(tl.where(key < thr[:, None, None], key, float("-inf")))
        sel = (key >= thr[:, None, None]) & m3
        n_sel = tl.where(rmask, _row_count(sel), K)
        if tl.max(n_sel, axis=0) > K:
            # Exact path (an exact tie straddles the threshold in some row of the tile).
            prev = tl.full([BLOCK_T], float("inf"), tl.float32)
            taken = tl.zeros([BLOCK_T], tl.int32)
            thr = tl.full([BLOCK_T], float("-inf"), tl.float32)
            for _ in tl.static_range(K):
                m = _row_max(tl.where(key < prev[:, None, None], key, float("-inf")))
                thr = tl.where(taken < K, m, thr)
                taken += _row_count(key == m[:, None, None])
                prev = m
            above = (key > thr[:, None, None]) & m3
            tied = (key == thr[:, None, None]) & m3
            need = K - _row_count(above)
            rank = _row_cumsum(tied.to(tl.int32))  # 1-based among the tied, by expert id
            sel = above | (tied & (rank <= need[:, None, None]))

        slot = _row_cumsum(sel.to(tl.int32)) - 1
        out = rows[:, None, None] * K + slot  # int32: T * K < 2**31 (checked on the host)
        ids = tl.zeros([BLOCK_T, GP, EGP], tl.int32) + col_GE[None, :, :]
        tl.store(experts_ptr + out, ids.to(tl.int64), mask=sel)
        w = s
        if NORMALIZE:
            total = tl.sum(tl.sum(tl.where(sel, s, 0.0), axis=2), axis=1)
            w = s / tl.maximum(total, 1.1754943508222875e-38)[:, None, None]
        tl.store(weights_ptr + out, w * route_scale, mask=sel)
        hist += sel.to(tl.int32)
    hist_GE = tl.sum(hist, axis=0)
    tl.atomic_add(load_ptr + col_GE, hist_GE, mask=valid_GE & (hist_GE > 0))


@triton.jit
def _slot(
    logits_ptr, experts_ptr, grad_w_ptr, rows, rmask, zmax, den, E, K, k, SOFTMAX: tl.constexpr
):
    """Slot k of each row: (a_k = s[e_k] from the gathered logit, gate gradient g_k, e_k)."""
    e_k = tl.load(experts_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=-1)
    z_k = tl.load(logits_ptr + rows.to(tl.int64) * E + e_k, mask=rmask, other=0.0)
    z_k = z_k.to(tl.float32)
    a_k = tl.exp(z_k - zmax) / den if SOFTMAX else 1.0 / (1.0 + tl.exp(-z_k))
    g_k = tl.load(grad_w_ptr + rows.to(tl.int64) * K + k, mask=rmask, other=0.0)
    return a_k, g_k.to(tl.float32), e_k


@triton.jit
def _router_bwd_kernel(
    logits_ptr,
    experts_ptr,
    grad_w_ptr,
    dlogits_ptr,
    T,
    num_tiles,
    route_scale,
    E: tl.constexpr,
    K: tl.constexpr,
    EP: tl.constexpr,
    SOFTMAX: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dL/dz for w_k = c * a_k (/ S), a = s[sel], S = sum_k a_k.

    dL/da_j = c * g_j (plain) or c * (g_j - sum_k g_k a_k / S) / S (normalized);
    sigmoid: dz_j = dL/da_j * a_j (1 - a_j) at the selected experts, 0 elsewhere;
    softmax: dz = s * (ds - sum_k ds_k a_k) over all E, ds = dL/da on the selected.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    col = tl.arange(0, EP)
    rt = tl.arange(0, BLOCK_T)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_T + rt
        rmask = rows < T
        base = rows.to(tl.int64) * E
        m2 = rmask[:, None] & (col[None, :] < E)
        zmax = tl.zeros([BLOCK_T], tl.float32)
        den = tl.zeros([BLOCK_T], tl.float32) + 1.0
        if SOFTMAX:
            z = tl.load(logits_ptr + base[:, None] + col[None, :], mask=m2, other=float("-inf"))
            z = z.to(tl.float32)
            zmax = tl.where(rmask, tl.max(z, axis=1), 0.0)
            ex = tl.exp(z - zmax[:, None])
            den = tl.where(rmask, tl.sum(ex, axis=1), 1.0)
            s = ex / den[:, None]
        # Per-slot scalars: a_k = s[e_k] from the gathered logit, S = sum a_k, sum g_k a_k.
        total = tl.zeros([BLOCK_T], tl.float32)
        dot = tl.zeros([BLOCK_T], tl.float32)
        for k in tl.static_range(K):
            a_k, g_k, _ = _slot(
                logits_ptr, experts_ptr, grad_w_ptr, rows, rmask, zmax, den, E, K, k, SOFTMAX
            )
            total += a_k
            dot += g_k * a_k
        total = tl.maximum(total, 1.1754943508222875e-38)
        acc = tl.zeros([BLOCK_T, EP], tl.float32)
        dsum = tl.zeros([BLOCK_T], tl.float32)
        for k in tl.static_range(K):
            a_k, g_k, e_k = _slot(
                logits_ptr, experts_ptr, grad_w_ptr, rows, rmask, zmax, den, E, K, k, SOFTMAX
            )
            da_k = route_scale * ((g_k - dot / total) / total if NORMALIZE else g_k)
            if SOFTMAX:
                dsum += da_k * a_k
                val = da_k
            else:
                val = da_k * a_k * (1.0 - a_k)
            acc = tl.where(col[None, :] == e_k[:, None], val[:, None], acc)
        if SOFTMAX:
            acc = s * (acc - dsum[:, None])
        tl.store(
            dlogits_ptr + base[:, None] + col[None, :],
            acc.to(dlogits_ptr.dtype.element_ty),
            mask=m2,
        )


@dataclass(frozen=True)
class Launch:
    """Tile shape and grid of one launch: rows per program, warps, programs per SM."""

    block_t: int = 8
    num_warps: int = 4
    programs_per_sm: int = 8


@dataclass(frozen=True)
class FusedRouting:
    """`route_fused` result: experts int64 [T, K] (ascending id per token), weights float32
    [T, K] (differentiable w.r.t. the logits), load int64 [E] (selected pairs per expert)."""

    experts: torch.Tensor
    weights: torch.Tensor
    load: torch.Tensor


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_programs(num_tiles: int, device: torch.device, launch: Launch) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(num_tiles, sms * launch.programs_per_sm))
    return max(1, min(num_tiles, 4))  # interpreter: few programs, big tiles


def default_launch(cfg: RouterConfig, device: torch.device, backward: bool = False) -> Launch:
    """Tile shape used when none is given: the fastest of the H100 sweep at T = 65536
    (results/benchmarks/router_sweep.md); big tiles for the CPU interpreter."""
    if device.type != "cuda":
        return Launch(block_t=64, num_warps=4)
    if not backward:
        return Launch(block_t=16, num_warps=4, programs_per_sm=16)
    if cfg.num_experts >= 128:
        return Launch(block_t=2, num_warps=1, programs_per_sm=64)
    return Launch(block_t=8, num_warps=4, programs_per_sm=16)


def supports(
    cfg: RouterConfig, logits_TE: torch.Tensor, bias_E: torch.Tensor | None = None
) -> bool:
    """True when the fused kernel computes exactly `route(logits_TE, cfg, bias_E)`."""
    return (
        logits_TE.dim() == 2
        and logits_TE.shape[1] == cfg.num_experts
        and cfg.num_experts <= MAX_EXPERTS
        and logits_TE.dtype in LOGIT_DTYPES
        and (bias_E is None or tuple(bias_E.shape) == (cfg.num_experts,))
    )


def _check(cfg: RouterConfig, logits_TE: torch.Tensor, bias_E: torch.Tensor | None) -> None:
    if logits_TE.dim() != 2 or logits_TE.shape[1] != cfg.num_experts:
        raise ValueError(
            f"logits_TE shape={tuple(logits_TE.shape)} is invalid; allowed: (T, {cfg.num_experts})"
        )
    if logits_TE.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits_TE dtype={logits_TE.dtype} is invalid; allowed: {LOGIT_DTYPES}")
    if logits_TE.shape[0] * cfg.top_k >= 2**31:
        raise ValueError(f"logits_TE has T={logits_TE.shape[0]} rows; allowed: T * top_k < 2**31")
    if cfg.num_experts > MAX_EXPERTS:
        raise ValueError(
            f"num_experts={cfg.num_experts} is invalid for the fused router; "
            f"allowed: 1..{MAX_EXPERTS}"
        )
    if bias_E is not None and tuple(bias_E.shape) != (cfg.num_experts,):
        raise ValueError(
            f"bias_E shape={tuple(bias_E.shape)} is invalid; allowed: ({cfg.num_experts},)"
        )


def router_forward(
    logits_TE: torch.Tensor,
    cfg: RouterConfig,
    bias_E: torch.Tensor | None = None,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): experts int64 [T,K], weights f32 [T,K],
    load int64 [E]."""
    _check(cfg, logits_TE, bias_E)
    launch = launch or default_launch(cfg, logits_TE.device)
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    K = cfg.top_k
    G = cfg.num_groups if cfg.group_limited else 1
    EG = E // G
    dev = logits_TE.device
    experts_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    weights_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
    load_E = torch.zeros(E, dtype=torch.int32, device=dev)
    if T > 0:
        bias = (
            bias_E.to(device=dev, dtype=torch.float32).contiguous()
            if bias_E is not None
            else load_E  # unused (HAS_BIAS=False); any tensor keeps the signature
        )
        num_tiles = triton.cdiv(T, launch.block_t)
        grid = (_num_programs(num_tiles, dev, launch),)
        _router_fwd_kernel[grid](
            logits_TE,
            bias,
            experts_TK,
            weights_TK,
            load_E,
            T,
            num_tiles,
            float(cfg.route_scale),
            E=E,
            K=K,
            G=G,
            EG=EG,
            GP=_pow2(G),
            EGP=_pow2(EG),
            M=cfg.group_limit if G > 1 else 1,
            Q=cfg.group_topk if G > 1 else 1,
            SOFTMAX=cfg.score_fn == "softmax",
            HAS_BIAS=bias_E is not None,
            BIAS_MUL=cfg.bias_mode == "mul",
            GROUP_LIMITED=G > 1,
            NORMALIZE=cfg.normalize,
            BLOCK_T=launch.block_t,
            num_warps=launch.num_warps,
        )
    return experts_TK, weights_TK, load_E.to(torch.int64)


def router_backward(
    logits_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    grad_weights_TK: torch.Tensor,
    cfg: RouterConfig,
    launch: Launch | None = None,
) -> torch.Tensor:
    """dL/dlogits [T, E] (logits dtype) of the gates, given dL/dweights [T, K]."""
    launch = launch or default_launch(cfg, logits_TE.device, backward=True)
    T, E = logits_TE.shape
    dlogits_TE = torch.empty_like(logits_TE)
    if T > 0:
        num_tiles = triton.cdiv(T, launch.block_t)
        grid = (_num_programs(num_tiles, logits_TE.device, launch),)
        _router_bwd_kernel[grid](
            logits_TE,
            experts_TK,
            grad_weights_TK.to(torch.float32).contiguous(),
            dlogits_TE,
            T,
            num_tiles,
            float(cfg.route_scale),
            E=E,
            K=cfg.top_k,
            EP=_pow2(E),
            SOFTMAX=cfg.score_fn == "softmax",
            NORMALIZE=cfg.normalize,
            BLOCK_T=launch.block_t,
            num_warps=launch.num_warps,
        )
    return dlogits_TE


class _FusedRouter(torch.autograd.Function):
    """Autograd wrapper: the gates are differentiable w.r.t. the logits; ids, load and the
    bias (which only selects) get no gradient."""

    @staticmethod
    def forward(ctx, logits_TE, bias_E, cfg, launch, bwd_launch):  # type: ignore[override]
        logits_TE = logits_TE.contiguous()
        experts_TK, weights_TK, load_E = router_forward(logits_TE, cfg, bias_E, launch)
        ctx.save_for_backward(logits_TE, experts_TK)
        ctx.cfg = cfg
        ctx.bwd_launch = bwd_launch
        ctx.mark_non_differentiable(experts_TK, load_E)
        return experts_TK, weights_TK, load_E

    @staticmethod
    def backward(ctx, _g_experts, g_weights, _g_load):  # type: ignore[override]
        logits_TE, experts_TK = ctx.saved_tensors
        dlogits = router_backward(logits_TE, experts_TK, g_weights, ctx.cfg, ctx.bwd_launch)
        return dlogits, None, None, None, None


def route_fused(
    logits_TE: torch.Tensor,
    cfg: RouterConfig,
    bias_E: torch.Tensor | None = None,
    launch: Launch | None = None,
    bwd_launch: Launch | None = None,
) -> FusedRouting:
    """Fused equivalent of `moebench.routing.route` (ids as sets, gates to rounding) plus
    the load histogram; differentiable w.r.t. `logits_TE` through the gates. `launch` /
    `bwd_launch` override the tile shapes of the forward / backward kernels."""
    experts_TK, weights_TK, load_E = _FusedRouter.apply(logits_TE, bias_E, cfg, launch, bwd_launch)
    return FusedRouting(experts_TK, weights_TK, load_E)
