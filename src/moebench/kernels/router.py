"""Fused Triton router: one pass over the logits computes the scores, bias, group limit, top-K,
gates and the per-expert load histogram; a second kernel gives the gates' logit gradient.

Semantics are exactly `moebench.routing.route` (docs/routing.md §7):

    s      = softmax(z) | sigmoid(z)                      float32 ([V2] eq. 22, [V3] eq. 15)
    key    = s + b | s * b                                ([V3] eq. 16, [LF] §4.3)
    groups ranked by max / top-2 sum / top-(K//M) sum of key; keep M; others -inf
    sel    = top-K of key;  w = route_scale * s[sel] (/ sum s[sel] if normalize)

How the selection stays cheap (the instruction count per logit, not the bytes, bounded the
first version: results/benchmarks/h100-2026-11-23/NOTES.md):
- Tile layout. A program holds W x R rows; one row is spread over LPR = GP x L lanes of one
  warp, so every thread holds CI x V experts of one group of one row (the tile axes are
  [CI, W, GP, L, R, V]; V contiguous experts are one vector load). Group reductions are then
  mostly inside a thread and row reductions need log2(LPR) shuffles; no reduction crosses
  warps.
- Group score: the top-2 sum (with multiplicity) is one tuple reduction (running max and
  second max); M rounds of a max over the GP group scores keep the M best groups.
- Top-K by packed keys. Each key becomes an order-preserving int32 (float bits, negatives
  flipped) whose low IB = ceil(log2 E) bits are replaced by (2^IB - 1 - expert id), so one
  integer max gives the largest key and, among keys equal in the remaining bits, the lower
  id. Round r+1 takes the largest packed key below round r's: with p the previous maximum,
  min over unsigned (p - 1 - packed) is one subtract and one min per element. K + 1 rounds
  give the K selected experts in descending key order, and the (K+1)-th bounds the set.
- Exactness. Truncating IB bits can only misorder keys that agree in their top 32 - IB bits.
  If any two consecutive of the K + 1 packed maxima agree there, the tile recomputes its
  keys from the logits and takes the exact path: K rounds of a float max, the lowest id
  among the equal keys, and that expert removed (0.4 % of rows of V3-like random logits,
  in a CPU simulation; results/benchmarks/h100-2026-11-23/NOTES.md).
- Gates: each of the first K lanes of a row owns one slot: it loads the logit of its expert
  again (an L1 hit), recomputes s, normalizes over the K lanes and stores id and gate.

Conventions (identical to the reference):
- Ties: the lower expert index wins, both for groups and for experts.
- Output order: the K experts of a token come in descending key order, ties by ascending id
  (the reference's order).
- Normalization has no epsilon; the sum is clamped to the smallest normal float32.
- The load histogram counts every selected (token, expert) pair (int64 [E]).

Load histogram without contended atomics. Each program accumulates its rows' selections in
registers and stores its E counts with plain stores into its own row of a [P, E] buffer;
one reduction over P gives the load. Global atomics on the E hot counters bounded the second
version: the H100 retired only ~3-4 G of them per second (E 64: 132 us with one atomic per
selected pair vs 36 us without; V3: a ~165 us ceiling at T = 65536;
results/benchmarks/h100-2026-11-23/NOTES.md, run 3). `Launch.atomic_load` keeps the
per-pair variant for comparison.

Legend: T tokens, E routed experts, K experts per token, G groups, EG experts per group,
GP / EGP: G, EG padded to powers of two; tile axes CI (vectors per thread), W (warps),
L (lanes per group), R (rows per warp), V (vector width); LPR = GP * L lanes per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moebench.routing import RouterConfig

MAX_EXPERTS = 1024
MAX_TOP_K = 32  # one slot per lane of a row
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32: the gate sum clamp
TUPLE_TOP2 = False  # also use the GPU's tuple top-2 reduction in the interpreter (tests)


@triton.jit
def _gmax(x):
    """Max over each group of a [CI, W, GP, L, R, V] tile -> [1, W, GP, 1, R, 1]."""
    x = tl.max(tl.max(x, axis=5, keep_dims=True), axis=0, keep_dims=True)
    return tl.max(x, axis=3, keep_dims=True)


@triton.jit
def _gsum(x):
    """Sum over each group of a [CI, W, GP, L, R, V] tile -> [1, W, GP, 1, R, 1]."""
    x = tl.sum(tl.sum(x, axis=5, keep_dims=True), axis=0, keep_dims=True)
    return tl.sum(x, axis=3, keep_dims=True)


@triton.jit
def _rmax(x):
    """Max over each row of a [CI, W, GP, L, R, V] tile -> [1, W, 1, 1, R, 1]."""
    return tl.max(_gmax(x), axis=2, keep_dims=True)


@triton.jit
def _rmin(x):
    """Min over each row of a [CI, W, GP, L, R, V] tile -> [1, W, 1, 1, R, 1]."""
    x = tl.min(tl.min(x, axis=5, keep_dims=True), axis=0, keep_dims=True)
    return tl.min(tl.min(x, axis=3, keep_dims=True), axis=2, keep_dims=True)


@triton.jit
def _packed_max(packed, keep):
    """Largest int32 of each row over the kept groups (`keep` [1, W, GP | 1, 1, R, 1]):
    a thread holds one group, so the mask applies to its partial maximum, not to every key."""
    x = tl.max(tl.max(packed, axis=5, keep_dims=True), axis=0, keep_dims=True)
    x = tl.where(keep, x, -2147483648)
    return tl.max(tl.max(x, axis=3, keep_dims=True), axis=2, keep_dims=True)


@triton.jit
def _packed_below(packed, p, keep):
    """Largest packed key below p of each row, over the kept groups: p - 1 - min over the
    unsigned differences p - 1 - packed (keys at or above p wrap to large values)."""
    below = ((p - 1) - packed).to(tl.uint32, bitcast=True)
    x = tl.min(tl.min(below, axis=5, keep_dims=True), axis=0, keep_dims=True)
    x = tl.where(keep, x, 0xFFFFFFFF)
    d = tl.min(tl.min(x, axis=3, keep_dims=True), axis=2, keep_dims=True)
    return (p - 1) - d.to(tl.int32, bitcast=True)


@triton.jit
def _top2_combine(a1, a2, b1, b2):
    """Merge two (largest, second largest) pairs, ties kept with multiplicity."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _group_top2_sum(key, TUPLE: tl.constexpr):
    """Sum of the 2 largest keys of each group (with multiplicity) -> [1, W, GP, 1, R, 1].

    TUPLE: one reduction of (max, second max) pairs (3 instructions per key on the GPU);
    else max, count of the max and max below it (three reductions; the interpreter runs
    a tuple reduction element by element, far too slowly for the tests)."""
    if TUPLE:
        t1, t2 = tl.reduce(
            (key, tl.full(key.shape, float("-inf"), tl.float32)), 5, _top2_combine, keep_dims=True
        )
        t1, t2 = tl.reduce((t1, t2), 0, _top2_combine, keep_dims=True)
        t1, t2 = tl.reduce((t1, t2), 3, _top2_combine, keep_dims=True)
    else:
        t1 = _gmax(key)
        below = _gmax(tl.where(key < t1, key, float("-inf")))
        t2 = tl.where(_gsum((key == t1).to(tl.int32)) > 1, t1, below)
    return t1 + t2


@triton.jit
def _group_topq_sum(key, Q: tl.constexpr):
    """Sum of the Q largest keys of each group, ties counted with multiplicity."""
    prev = tl.full([1, key.shape[1], key.shape[2], 1, key.shape[4], 1], float("inf"), tl.float32)
    taken = tl.zeros(prev.shape, tl.int32)
    total = tl.zeros(prev.shape, tl.float32)
    for _ in tl.static_range(Q):
        m = _gmax(tl.where(key < prev, key, float("-inf")))
        take = tl.minimum(_gsum((key == m).to(tl.int32)), Q - taken)
        total += tl.where(take > 0, m, 0.0) * take.to(tl.float32)
        taken += take
        prev = m
    return total


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    """2^x; FAST: one MUFU.EX2 with subnormal results flushed to zero (GPU only), instead
    of the subnormal-safe sequence of four instructions."""
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return tl.exp2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x; FAST: one MUFU.RCP (1 ulp, subnormals flushed; GPU only)."""
    if FAST:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return 1.0 / x


@triton.jit
def _sigmoid(z, FAST: tl.constexpr):
    return _rcp(1.0 + _exp2(z * -1.4426950408889634, FAST), FAST)


@triton.jit
def _scores_keys(z, bias, rmask, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_MUL: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
    """Scores s, selection keys, the softmax row max and reciprocal denominator (sigmoid:
    0 and 1)."""
    if SOFTMAX:
        zmax = tl.where(rmask, _rmax(z), 0.0)
        ex = _exp2((z - zmax) * 1.4426950408889634, FAST)
        rden = _rcp(tl.where(rmask, tl.sum(_gsum(ex), axis=2, keep_dims=True), 1.0), FAST)
        s = ex * rden
    else:
        zmax = tl.zeros(rmask.shape, tl.float32)
        rden = zmax + 1.0
        s = _sigmoid(z, FAST)
    key = s
    if HAS_BIAS:
        # + 0.0 turns the product -0.0 (s = 0, b < 0) into +0.0, which the packed keys
        # would otherwise rank below +0.0
        key = s * bias + 0.0 if BIAS_MUL else s + bias
    return key, zmax, rden


@triton.jit
def _load_tile(ptrs, rmask, valid, FULL: tl.constexpr):
    """float32 logits of a tile; padding -inf. Full tiles skip the fill value (rows past T
    hold garbage that is masked out everywhere), saving one move per logit."""
    if FULL:
        return tl.load(ptrs, mask=rmask).to(tl.float32)
    return tl.load(ptrs, mask=rmask & valid, other=float("-inf")).to(tl.float32)


@triton.jit
def _router_fwd_kernel(
    logits_ptr,
    bias_ptr,
    experts_ptr,
    weights_ptr,
    load_ptr,  # int32 [P, E] per-program counts, or [E] with ATOMIC_LOAD
    T,
    num_tiles,
    route_scale,
    E: tl.constexpr,
    K: tl.constexpr,
    G: tl.constexpr,
    EG: tl.constexpr,
    GP: tl.constexpr,
    CI: tl.constexpr,
    W: tl.constexpr,
    L: tl.constexpr,
    R: tl.constexpr,
    V: tl.constexpr,
    IB: tl.constexpr,
    M: tl.constexpr,
    Q: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_MUL: tl.constexpr,
    GROUP_LIMITED: tl.constexpr,
    NORMALIZE: tl.constexpr,
    FULL: tl.constexpr,
    NEXT: tl.constexpr,
    ATOMIC_LOAD: tl.constexpr,
    TUPLE_TOP2: tl.constexpr,
    FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ci = tl.arange(0, CI)[:, None, None, None, None, None]
    g = tl.arange(0, GP)[None, None, :, None, None, None]
    ln = tl.arange(0, L)[None, None, None, :, None, None]
    v = tl.arange(0, V)[None, None, None, None, None, :]
    inner = ci * (L * V) + ln * V + v
    col = g * EG + inner  # expert id of every tile position, [CI, 1, GP, L, 1, V]
    valid = (g < G) & (inner < EG)
    low = (1 << IB) - 1 - col  # the packed key's low bits: the lower id ranks higher
    slot = g * L + ln  # the output slot a lane owns, [1, 1, GP, L, 1, 1]
    rowoff = (
        tl.arange(0, W)[None, :, None, None, None, None] * R
        + tl.arange(0, R)[None, None, None, None, :, None]
    )
    bias = tl.zeros([CI, 1, GP, L, 1, V], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + col, mask=valid, other=0.0)
    if not ATOMIC_LOAD:
        hist = tl.zeros([CI, W, GP, L, R, V], tl.int32)  # summed over rows after the loop
    for tile in range(pid, num_tiles, nprog):
        rows = tile * (W * R) + rowoff  # [1, W, 1, 1, R, 1]
        rmask = rows < T
        base = logits_ptr + rows.to(tl.int64) * E
        z = _load_tile(base + col, rmask, valid, FULL)
        key, zmax, rden = _scores_keys(z, bias, rmask, SOFTMAX, HAS_BIAS, BIAS_MUL, FAST)
        if not FULL:
            key = tl.where(valid, key, float("-inf"))
        usable = valid
        keep = rmask | True  # [1, W, 1, 1, R, 1] all True: every group kept
        if GROUP_LIMITED:
            if Q == 1:
                gscore = _gmax(key)
            elif Q == 2:
                gscore = _group_top2_sum(key, TUPLE_TOP2)
            else:
                gscore = _group_topq_sum(key, Q)
            gscore = tl.where(g < G, gscore, float("-inf"))
            keep = gscore != gscore  # [1, W, GP, 1, R, 1] all False
            for _ in tl.static_range(M):
                best = tl.max(gscore, axis=2, keep_dims=True)
                first = tl.min(tl.where(gscore == best, g, GP), axis=2, keep_dims=True)
                hit = g == first
                keep = keep | hit
                gscore = tl.where(hit, float("-inf"), gscore)
            usable = valid & keep

        # Packed keys: order-preserving int32 of the key, low IB bits = 2^IB - 1 - id.
        bits = key.to(tl.int32, bitcast=True)
        packed = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) & -(1 << IB)) | low
        if not FULL:
            packed = tl.where(valid, packed, -2147483648)
        # Dropped groups are masked on each thread's partial result (one select per round)
        # rather than on every key: a thread holds experts of a single group.
        p = _packed_max(packed, keep)  # [1, W, 1, 1, R, 1]
        p_k = p
        pvec = tl.where(slot == 0, p, 0)  # [1, W, GP, L, R, 1]: slot r holds round r's max
        ambiguous = p != p  # all False
        for r in tl.static_range(1, K + NEXT):
            q = _packed_below(packed, p, keep)
            ambiguous = ambiguous | ((q >> IB) == (p >> IB))
            if r < K:
                pvec = tl.where(slot == r, q, pvec)
                p_k = q
            p = q
        ids = (1 << IB) - 1 - (pvec & ((1 << IB) - 1))
        if not ATOMIC_LOAD:
            sel = (packed >= p_k) & usable
        if tl.max((ambiguous & rmask).to(tl.int32)) > 0:
            # Exact path: recompute the float keys and take K rounds of (max, lowest id).
            z = _load_tile(base + col, rmask, valid, FULL)
            key, zmax, rden = _scores_keys(z, bias, rmask, SOFTMAX, HAS_BIAS, BIAS_MUL, FAST)
            key = tl.where(usable, key, float("-inf"))
            for r in tl.static_range(K):
                best = _rmax(key)
                first = _rmin(tl.where(key == best, col, E))
                ids = tl.where(slot == r, first, ids)
                key = tl.where(col == first, float("-inf"), key)
            if not ATOMIC_LOAD:
                sel = usable & (key == float("-inf"))

        # Gates: lane `slot` of a row reloads its expert's logit and recomputes s.
        smask = (slot < K) & rmask
        z_k = tl.load(base + ids, mask=smask, other=0.0).to(tl.float32)
        if SOFTMAX:
            s_k = _exp2((z_k - zmax) * 1.4426950408889634, FAST) * rden
        else:
            s_k = _sigmoid(z_k, FAST)
        if NORMALIZE:
            total = tl.sum(
                tl.sum(tl.where(smask, s_k, 0.0), axis=3, keep_dims=True), axis=2, keep_dims=True
            )
            s_k = s_k * _rcp(tl.maximum(total, TINY), FAST)
        out = rows * K + slot  # int32: T * K < 2**31 (checked on the host)
        tl.store(experts_ptr + out, ids.to(tl.int64), mask=smask)
        tl.store(weights_ptr + out, s_k * route_scale, mask=smask)
        if ATOMIC_LOAD:
            tl.atomic_add(load_ptr + ids, 1, mask=smask, sem="relaxed")
        else:
            hist += (sel & rmask).to(tl.int32)
    if not ATOMIC_LOAD:
        counts = tl.sum(tl.sum(hist, axis=4, keep_dims=True), axis=1, keep_dims=True)
        tl.store(load_ptr + pid * E + col, counts, mask=valid)


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
        total = tl.maximum(total, TINY)
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
    """Launch shape. Forward: `num_warps` warps per program, `lanes_per_row` lanes per token
    row (0 = the smallest that gives every slot a lane and each thread at most 32 experts),
    so W x 32 / lanes_per_row rows per program; `atomic_load` counts the load histogram with
    one global atomic per selected pair instead of a per-program register histogram stored
    without atomics (measured slower: the module docstring). Backward:
    `block_t` rows and `num_warps` warps per program. Both: `programs_per_sm` programs per
    multiprocessor in the persistent grid."""

    block_t: int = 8
    num_warps: int = 4
    programs_per_sm: int = 8
    lanes_per_row: int = 0
    atomic_load: bool = False


@dataclass(frozen=True)
class FusedRouting:
    """`route_fused` result: experts int64 [T, K] (descending key per token, as the reference),
    weights float32 [T, K] (differentiable w.r.t. the logits), load int64 [E] (selected pairs
    per expert)."""

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


def _groups(cfg: RouterConfig) -> int:
    return cfg.num_groups if cfg.group_limited else 1


def fwd_layout(cfg: RouterConfig, launch: Launch) -> dict[str, int]:
    """The forward tile's axis sizes (see the module docstring) for a config and launch."""
    G = _groups(cfg)
    GP, EGP = _pow2(G), _pow2(cfg.num_experts // G)
    lanes = max(GP, _pow2(cfg.top_k), GP * EGP // 32, launch.lanes_per_row)
    L = min(lanes // GP, EGP)
    V = min(4, EGP // L)
    return {"GP": GP, "CI": EGP // (L * V), "W": launch.num_warps, "L": L, "R": 32 // (GP * L),
            "V": V}  # fmt: skip


def default_launch(cfg: RouterConfig, device: torch.device, backward: bool = False) -> Launch:
    """Launch used when none is given: the fastest of the H100 sweeps at T = 65536
    (forward: 2 warps, 16 programs per SM for both the V3 and the E 64 case,
    results/benchmarks/h100-2026-11-23/router_run3_sweep.md; backward: router_sweep.md).
    Many rows per program for the CPU interpreter."""
    if device.type != "cuda":
        return Launch(block_t=64, num_warps=16)
    if not backward:
        return Launch(num_warps=2, programs_per_sm=16)
    if cfg.num_experts >= 128:
        return Launch(block_t=2, num_warps=1, programs_per_sm=64)
    return Launch(block_t=8, num_warps=4, programs_per_sm=16)


def supports(
    cfg: RouterConfig, logits_TE: torch.Tensor, bias_E: torch.Tensor | None = None
) -> bool:
    """True when the fused kernel computes exactly `route(logits_TE, cfg, bias_E)`."""
    return _problem(cfg, logits_TE, bias_E) is None


def _problem(cfg: RouterConfig, logits_TE: torch.Tensor, bias_E: torch.Tensor | None) -> str | None:
    """Why the fused kernel cannot route `logits_TE` for `cfg` (the one list of its limits,
    read by `supports` and by `fused_route`'s refusal); None when it can."""
    E = cfg.num_experts
    if logits_TE.dim() != 2 or logits_TE.shape[1] != E:
        return f"logits_TE shape={tuple(logits_TE.shape)} is invalid; allowed: (T, {E})"
    if logits_TE.dtype not in LOGIT_DTYPES:
        return f"logits_TE dtype={logits_TE.dtype} is invalid; allowed: {LOGIT_DTYPES}"
    if logits_TE.shape[0] * cfg.top_k >= 2**31:
        return f"logits_TE has T={logits_TE.shape[0]} rows; allowed: T * top_k < 2**31"
    if E > MAX_EXPERTS:
        return f"num_experts={E} is invalid for the fused router; allowed: 1..{MAX_EXPERTS}"
    if cfg.top_k > MAX_TOP_K:
        return f"top_k={cfg.top_k} is invalid for the fused router; allowed: 1..{MAX_TOP_K}"
    if _pow2(_groups(cfg)) > 32:
        return f"num_groups={cfg.num_groups} is invalid for the fused router; allowed: 1..32"
    if bias_E is not None and tuple(bias_E.shape) != (E,):
        return f"bias_E shape={tuple(bias_E.shape)} is invalid; allowed: ({E},)"
    return None


def router_forward(
    logits_TE: torch.Tensor,
    cfg: RouterConfig,
    bias_E: torch.Tensor | None = None,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (no autograd): experts int64 [T,K], weights f32 [T,K],
    load int64 [E]."""
    if (problem := _problem(cfg, logits_TE, bias_E)) is not None:
        raise ValueError(problem)
    launch = launch or default_launch(cfg, logits_TE.device)
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    K = cfg.top_k
    G = _groups(cfg)
    EG = E // G
    dev = logits_TE.device
    experts_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    weights_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
    if T == 0:
        return experts_TK, weights_TK, torch.zeros(E, dtype=torch.int64, device=dev)
    lay = fwd_layout(cfg, launch)
    num_tiles = triton.cdiv(T, lay["W"] * lay["R"])
    grid = (_num_programs(num_tiles, dev, launch),)
    # counts: [E] for one atomic per pair, else one row per program (every entry stored)
    if launch.atomic_load:
        counts = torch.zeros(E, dtype=torch.int32, device=dev)
    else:
        counts = torch.empty(grid[0], E, dtype=torch.int32, device=dev)
    bias = (
        bias_E.to(device=dev, dtype=torch.float32).contiguous()
        if bias_E is not None
        else counts  # unused (HAS_BIAS=False); any tensor keeps the signature
    )
    _router_fwd_kernel[grid](
        logits_TE,
        bias,
        experts_TK,
        weights_TK,
        counts,
        T,
        num_tiles,
        float(cfg.route_scale),
        E=E,
        K=K,
        G=G,
        EG=EG,
        **lay,
        IB=max(1, (E - 1).bit_length()),
        M=cfg.group_limit if G > 1 else 1,
        Q=cfg.group_topk if G > 1 else 1,
        SOFTMAX=cfg.score_fn == "softmax",
        HAS_BIAS=bias_E is not None,
        BIAS_MUL=cfg.bias_mode == "mul",
        GROUP_LIMITED=G > 1,
        NORMALIZE=cfg.normalize,
        FULL=lay["GP"] == G and lay["CI"] * lay["L"] * lay["V"] == EG,
        NEXT=int(K < E),
        ATOMIC_LOAD=launch.atomic_load,
        TUPLE_TOP2=TUPLE_TOP2 or dev.type == "cuda",
        FAST=dev.type == "cuda",
        num_warps=lay["W"],
    )
    load_E = counts.to(torch.int64) if launch.atomic_load else counts.sum(0)
    return experts_TK, weights_TK, load_E


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
