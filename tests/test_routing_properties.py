"""Hypothesis property tests of moebench.routing: the invariants of docs/routing.md §9, and group
selection equal to a brute-force reference (every subset of M groups, per-token loop) for
every group-scoring rule.

Configurations, sizes and bias kinds (none, small, large negative, wide) are drawn by
hypothesis; the tensors come from a drawn seed so that inputs are continuous (tie-free
with probability 1). Tie-sensitive comparisons skip tokens whose keys or group scores are
closer than a float32 rounding margin.

Legend: T tokens, E routed experts, K experts per token, G groups, M group limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations, pairwise

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moebench.metrics import groups_per_token
from moebench.routing import RouterConfig, group_mask, route, scores, selection_key

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Case:
    """One drawn router input: `logits` [T, E] float32, `bias` [E] float32 or None."""

    cfg: RouterConfig
    logits: torch.Tensor
    bias: torch.Tensor | None


@st.composite
def cases(
    draw: st.DrawFn,
    bias_kinds: tuple[str, ...] = ("none", "small", "neg", "wide"),
    binding: bool = False,
) -> Case:
    """A valid RouterConfig plus logits [T, E] and a bias of the drawn kind. With
    `binding`, the group limit can bind: 1 < G, M < G, K > M (docs/routing.md Example 2b)."""
    G = draw(st.sampled_from([2, 3, 4, 6, 8] if binding else [1, 2, 3, 4, 6, 8]))
    epg = draw(st.integers(2 if binding else 1, 6))
    E = G * epg
    M = draw(st.integers(1, G - 1 if binding else G))
    K = draw(st.integers(M + 1 if binding else 1, M * epg if G > 1 else E))
    rules = ["max"]
    if G == 1 or epg >= 2:
        rules.append("top2_sum")
    if G == 1 or K >= M:
        rules.append("topk_sum")
    cfg = RouterConfig(
        num_experts=E,
        top_k=K,
        score_fn=draw(st.sampled_from(["softmax", "sigmoid"])),
        num_groups=G,
        group_limit=M,
        group_score=draw(st.sampled_from(rules)),
        normalize=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])),
        bias_mode=draw(st.sampled_from(["add", "mul"])),
    )
    T = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits_TE = torch.randn(T, E, generator=gen) * draw(st.sampled_from([0.5, 2.0, 5.0]))
    kind = draw(st.sampled_from(bias_kinds))
    base = 0.0 if cfg.bias_mode == "add" else 1.0
    bias_E = {
        "none": None,
        "small": base + 0.1 * torch.randn(E, generator=gen),
        # large negative biases on a random half of the experts: the case that breaks
        # 0.0 masking (docs/routing.md §6.3, Example 6)
        "neg": torch.where(
            torch.rand(E, generator=gen) < 0.5, -1000.0 * torch.rand(E, generator=gen), base
        ),
        "wide": base + 100.0 * torch.randn(E, generator=gen),
    }[kind]
    return Case(cfg, logits_TE, bias_E)


def key_of(case: Case, scores_TE: torch.Tensor) -> torch.Tensor:
    """The selection key computed independently of the router: s + b or s * b (float32)."""
    if case.bias is None:
        return scores_TE
    return scores_TE + case.bias if case.cfg.bias_mode == "add" else scores_TE * case.bias


def group_scores_bf(key: list[float], cfg: RouterConfig) -> list[float]:
    """Per-group score by the rule, computed in Python floats from sorted group members."""
    epg, q = cfg.experts_per_group, cfg.group_topk
    members = [sorted(key[g * epg : (g + 1) * epg], reverse=True) for g in range(cfg.num_groups)]
    return [m[0] if cfg.group_score == "max" else sum(m[:q]) for m in members]


def tie_free(values: list[float], margin: float) -> bool:
    ordered = sorted(values)
    return all(b - a > margin for a, b in pairwise(ordered))


def margin_of(*keys: list[float]) -> float:
    """Tie margin: far above float32 rounding of a few additions at the keys' magnitude."""
    return 1e-6 * (1.0 + max(abs(v) for key in keys for v in key))


def brute_force(key: list[float], cfg: RouterConfig) -> tuple[list[int], set[int]]:
    """(selected experts in descending key order, kept groups) for one tie-free token: the
    kept set is the unique M-subset whose every score beats every dropped group's score."""
    E, G, M = cfg.num_experts, cfg.num_groups, cfg.group_limit
    kept: set[int] = set(range(G))
    if cfg.group_limited:
        gs = group_scores_bf(key, cfg)
        subsets = [
            set(S)
            for S in combinations(range(G), M)
            if min(gs[g] for g in S) > max(gs[g] for g in range(G) if g not in S)
        ]
        assert len(subsets) == 1
        kept = subsets[0]
    allowed = [i for i in range(E) if i // cfg.experts_per_group in kept]
    return sorted(allowed, key=lambda i: (-key[i], i))[: cfg.top_k], kept


def tie_free_tokens(case: Case, *keys_TE: torch.Tensor) -> list[int]:
    """Tokens whose keys (and group scores) are separated by more than the margin in
    every one of `keys_TE`."""
    out = []
    for t in range(case.logits.shape[0]):
        rows = [k[t].tolist() for k in keys_TE]
        margin = margin_of(*rows)
        if all(
            tie_free(r, margin) and tie_free(group_scores_bf(r, case.cfg), margin) for r in rows
        ):
            out.append(t)
    return out


# ---------------------------------------------------------------- §9.1, 9.2, 9.7


@SETTINGS
@given(cases())
def test_exactly_k_distinct_within_m_kept_groups(case: Case) -> None:
    cfg = case.cfg
    r = route(case.logits, cfg, case.bias)
    T = case.logits.shape[0]
    assert r.experts.shape == r.weights.shape == (T, cfg.top_k)
    assert r.experts.dtype == torch.int64 and r.weights.dtype == torch.float32
    assert bool(((r.experts >= 0) & (r.experts < cfg.num_experts)).all())
    assert all(len(set(row)) == cfg.top_k for row in r.experts.tolist())
    group_E = cfg.group_of_expert()
    limit = cfg.group_limit if cfg.group_limited else cfg.num_groups
    assert bool((groups_per_token(r.experts, group_E) <= limit).all())
    keep_TG = group_mask(selection_key(r.scores, case.bias, cfg), cfg)
    assert bool((keep_TG.sum(dim=1) == limit).all())
    assert bool(keep_TG.gather(1, group_E[r.experts]).all())  # every expert in a kept group


@SETTINGS
@given(cases(bias_kinds=("neg",), binding=True))
def test_at_most_m_groups_under_large_negative_bias(case: Case) -> None:
    r = route(case.logits, case.cfg, case.bias)
    group_E = case.cfg.group_of_expert()
    assert bool((groups_per_token(r.experts, group_E) <= case.cfg.group_limit).all())


# ---------------------------------------------------------------- §9.3


@SETTINGS
@given(cases())
def test_m_equal_groups_is_plain_top_k(case: Case) -> None:
    cfg = case.cfg
    unlimited = replace(cfg, group_limit=cfg.num_groups, group_score="max")
    plain = replace(cfg, num_groups=1, group_limit=1)
    a = route(case.logits, unlimited, case.bias)
    b = route(case.logits, plain, case.bias)
    assert torch.equal(a.experts, b.experts) and torch.equal(a.weights, b.weights)
    key_TE = key_of(case, b.scores)
    for t in tie_free_tokens(case, key_TE):
        assert set(b.experts[t].tolist()) == set(key_TE[t].topk(cfg.top_k).indices.tolist())


# ---------------------------------------------------------------- brute force, every rule


@SETTINGS
@given(st.one_of(cases(), cases(binding=True)))
def test_group_selection_equals_brute_force(case: Case) -> None:
    cfg = case.cfg
    r = route(case.logits, cfg, case.bias)
    key_TE = key_of(case, r.scores)
    keep_TG = group_mask(key_TE, cfg)
    tokens = tie_free_tokens(case, key_TE)
    event(f"tie-free tokens compared: {'some' if tokens else 'none'}")
    for t in tokens:
        experts, kept = brute_force(key_TE[t].tolist(), cfg)
        unrestricted = sorted(range(cfg.num_experts), key=lambda i: -key_TE[t, i].item())
        binds = set(experts) != set(unrestricted[: cfg.top_k])
        event(f"group limit changed the selection of a token: {binds}")
        event(f"rule {cfg.group_score}, limit changed a selection: {binds}")
        assert r.experts[t].tolist() == experts
        assert set(torch.nonzero(keep_TG[t]).flatten().tolist()) == kept


# ---------------------------------------------------------------- §9.4, 9.5


@SETTINGS
@given(cases())
def test_gates_depend_only_on_scores_and_selected_set(case: Case) -> None:
    cfg = case.cfg
    r = route(case.logits, cfg, case.bias)
    s_TE = scores(case.logits, cfg.score_fn).double()
    assert torch.equal(r.scores, scores(case.logits, cfg.score_fn))
    s_TK = s_TE.gather(1, r.experts)
    total_T1 = s_TK.sum(dim=1, keepdim=True)
    expected = cfg.route_scale * (s_TK / total_T1 if cfg.normalize else s_TK)
    if cfg.normalize:
        expected = torch.where(total_T1 > 0, expected, 0.0)
    assert torch.allclose(r.weights.double(), expected, rtol=1e-5, atol=1e-30)
    sums_T = r.weights.double().sum(dim=1)
    if cfg.normalize:
        nonzero_T = total_T1.squeeze(1) > 0
        ones = torch.full_like(sums_T[nonzero_T], cfg.route_scale)
        assert torch.allclose(sums_T[nonzero_T], ones, rtol=1e-5)
    elif cfg.score_fn == "softmax":
        assert bool((sums_T <= cfg.route_scale * (1 + 1e-6)).all())


@SETTINGS
@given(cases(), st.floats(0.01, 10.0))
def test_bias_change_keeping_the_set_changes_no_gate(case: Case, boost: float) -> None:
    """Raising the bias of one token's selected experts keeps its set, so its gates stay."""
    cfg = case.cfg
    logits_1E = case.logits[:1]
    bias_E = case.bias if case.bias is not None else torch.full((cfg.num_experts,), 0.0)
    if case.bias is None and cfg.bias_mode == "mul":
        bias_E = torch.ones(cfg.num_experts)
    before = route(logits_1E, cfg, bias_E)
    raised_E = bias_E.clone()
    raised_E[before.experts[0]] += boost
    after = route(logits_1E, cfg, raised_E)
    assert set(after.experts[0].tolist()) == set(before.experts[0].tolist())
    order_b, order_a = before.experts[0].argsort(), after.experts[0].argsort()
    assert torch.allclose(before.weights[0, order_b], after.weights[0, order_a], rtol=1e-6)


# ---------------------------------------------------------------- §9.6


@SETTINGS
@given(cases(bias_kinds=("small", "neg", "wide")), st.floats(-5.0, 5.0), st.floats(0.25, 4.0))
def test_constant_bias_shift_changes_no_selection(case: Case, shift: float, factor: float) -> None:
    """Add mode: b + c ranks like b. Mul mode: the analogue is b * c for c > 0."""
    cfg = case.cfg
    assert case.bias is not None
    moved_E = case.bias + shift if cfg.bias_mode == "add" else case.bias * factor
    a = route(case.logits, cfg, case.bias)
    b = route(case.logits, cfg, moved_E)
    moved = Case(cfg, case.logits, moved_E)
    for t in tie_free_tokens(case, key_of(case, a.scores), key_of(moved, b.scores)):
        assert b.experts[t].tolist() == a.experts[t].tolist()
        assert torch.equal(b.weights[t], a.weights[t])


# ---------------------------------------------------------------- §9.8


@SETTINGS
@given(cases(), st.sampled_from([torch.bfloat16, torch.float16, torch.float64]))
def test_scores_are_float32_for_any_input_dtype(case: Case, dtype: torch.dtype) -> None:
    logits_TE = case.logits.to(dtype)
    r = route(logits_TE, case.cfg, case.bias)
    assert r.scores.dtype == r.weights.dtype == torch.float32
    assert torch.equal(r.scores, scores(logits_TE.float(), case.cfg.score_fn))
    same = route(logits_TE.float(), case.cfg, case.bias)
    assert torch.equal(r.experts, same.experts) and torch.equal(r.weights, same.weights)
