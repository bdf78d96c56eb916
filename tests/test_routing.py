"""Unit tests of moebench.routing: every hand-worked example of docs/routing.md §8 (with the
wrong answers it names asserted not to come out), ties, dtypes, gradients, validation,
presets and Layout.

Legend: T tokens, E routed experts, K experts per token, G groups.
"""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations

import pytest
import torch

from moebench.metrics import groups_per_token
from moebench.routing import (
    PRESETS,
    Layout,
    RouterConfig,
    gate_weights,
    group_mask,
    preset,
    route,
    scores,
    select_experts,
    selection_key,
)

# docs/routing.md §8, Examples 1-2: softmax logits and their scores.
EX1_LOGITS = [2.0, 0.0, 1.5, 1.4, 0.5, 1.8, 0.2, 0.1]
EX1_SCORES = [
    0.27416745, 0.03710453, 0.16629096, 0.15046629,
    0.06117503, 0.22446932, 0.04531957, 0.04100685,
]  # fmt: skip
# Examples 3-5: 12 experts on 4 nodes of 3; sigmoid scores and their 6-d.p. logits.
EX3_SCORES = [0.95, 0.10, 0.05, 0.70, 0.65, 0.20, 0.80, 0.60, 0.25, 0.30, 0.25, 0.12]
EX3_LOGITS = [
    2.944439, -2.197225, -2.944439, 0.847298, 0.619039, -1.386294,
    1.386294, 0.405465, -1.098612, -0.847298, -1.098612, -1.992430,
]  # fmt: skip
# Example 6.
EX6_SCORES = [0.30, 0.20, 0.10, 0.70, 0.40, 0.30, 0.80, 0.35, 0.20, 0.10, 0.05, 0.02]
EX6_BIAS = [0, 0, 0, 0, -0.45, -0.50, 0, -0.45, -0.50, 0, 0, 0]


def row(values: list[float]) -> torch.Tensor:
    """[1, E] float32 tensor."""
    return torch.tensor([values], dtype=torch.float32)


def logit_of(probs: list[float]) -> torch.Tensor:
    """[1, E] float32 logits whose sigmoid is `probs` (inverse computed in float64)."""
    p = torch.tensor([probs], dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def selected(r_experts_TK: torch.Tensor, t: int = 0) -> set[int]:
    return set(r_experts_TK[t].tolist())


def gates_by_expert(r, t: int = 0) -> dict[int, float]:
    return dict(zip(r.experts[t].tolist(), r.weights[t].tolist(), strict=True))


def ex3_cfg(**kw) -> RouterConfig:
    base = dict(
        num_experts=12, top_k=4, score_fn="sigmoid", num_groups=4, group_limit=2,
        group_score="top2_sum", normalize=True, route_scale=2.5,
    )  # fmt: skip
    return RouterConfig(**{**base, **kw})


# ---------------------------------------------------------------- Example 1


def test_example1_softmax_scores_and_plain_top2() -> None:
    cfg = RouterConfig(num_experts=8, top_k=2, score_fn="softmax")
    r = route(row(EX1_LOGITS), cfg)
    assert torch.allclose(r.scores, row(EX1_SCORES), atol=1e-7)
    assert math.isclose(float(torch.exp(torch.tensor(EX1_LOGITS)).sum()), 26.95088755, rel_tol=1e-7)
    assert r.experts.tolist() == [[0, 5]]  # descending score order
    assert torch.allclose(r.weights, row([0.27416745, 0.22446932]), atol=1e-7)
    assert math.isclose(float(r.weights.sum()), 0.49863677, abs_tol=1e-7)


# ---------------------------------------------------------------- Example 2


def ex2_cfg(**kw) -> RouterConfig:
    base = dict(num_experts=8, top_k=3, score_fn="softmax", num_groups=4, group_limit=2)
    return RouterConfig(**{**base, **kw})


def test_example2_v2_device_limited() -> None:
    cfg = ex2_cfg(group_score="max", route_scale=16.0)
    unrestricted = route(row(EX1_LOGITS), ex2_cfg(group_limit=4))
    assert selected(unrestricted.experts) == {0, 5, 2}
    assert group_mask(scores(row(EX1_LOGITS), "softmax"), cfg).tolist() == [
        [True, False, True, False]
    ]
    r = route(row(EX1_LOGITS), cfg)
    assert r.experts.tolist() == [[0, 5, 4]]
    expected = row([4.38667919, 3.59150916, 0.97880043])
    assert torch.allclose(r.weights, expected, atol=2e-6)
    assert math.isclose(float(r.weights.sum()), 8.95698878, abs_tol=5e-6)
    unscaled = route(row(EX1_LOGITS), ex2_cfg(group_score="max"))
    assert math.isclose(float(unscaled.weights.sum()), 0.55981180, abs_tol=1e-7)


def test_example2_v3_rule_is_not_the_v2_answer() -> None:
    """Ranking devices by the top-2 sum keeps {d0, d1} and selects {0, 2, 3}: that is the
    V3 rule applied to V2, which the "max" rule must not produce."""
    s = scores(row(EX1_LOGITS), "softmax")
    top2_sum_G = s.view(4, 2).sum(dim=1)  # two experts per device: top-2 sum = sum
    assert torch.allclose(
        top2_sum_G, torch.tensor([0.31127198, 0.31675725, 0.28564435, 0.08632642]), atol=1e-7
    )
    wrong = route(row(EX1_LOGITS), ex2_cfg(group_score="top2_sum"))
    assert selected(wrong.experts) == {0, 2, 3}
    assert selected(route(row(EX1_LOGITS), ex2_cfg(group_score="max")).experts) != {0, 2, 3}
    # topk_sum with K // M = 3 // 2 = 1 is the max rule.
    assert selected(route(row(EX1_LOGITS), ex2_cfg(group_score="topk_sum")).experts) == {0, 5, 4}


def test_example2b_k_le_m_never_binds() -> None:
    """8 experts on 4 devices, K = M = 2: device-limited == plain top-2 for all 28 pairs."""
    limited = RouterConfig(8, 2, "softmax", num_groups=4, group_limit=2, group_score="max")
    plain = RouterConfig(8, 2, "softmax")
    pairs = list(combinations(range(8), 2))
    assert len(pairs) == 28
    logits_TE = torch.zeros(len(pairs), 8)
    for t, (i, j) in enumerate(pairs):
        logits_TE[t, i], logits_TE[t, j] = 3.0, 2.0
    a, b = route(logits_TE, limited), route(logits_TE, plain)
    assert torch.equal(a.experts, b.experts)
    assert [selected(a.experts, t) for t in range(28)] == [set(p) for p in pairs]


# ---------------------------------------------------------------- Example 3


def test_example3_logits_reproduce_scores() -> None:
    assert torch.allclose(scores(row(EX3_LOGITS), "sigmoid"), row(EX3_SCORES), atol=6e-8)


@pytest.mark.parametrize("rule", ["top2_sum", "topk_sum"])
def test_example3_v3_node_limited(rule: str) -> None:
    cfg = ex3_cfg(group_score=rule)
    assert selected(route(row(EX3_LOGITS), ex3_cfg(group_limit=4)).experts) == {0, 6, 3, 4}
    assert group_mask(row(EX3_SCORES), cfg).tolist() == [[False, True, True, False]]
    r = route(row(EX3_LOGITS), cfg)
    assert selected(r.experts) == {3, 4, 6, 7}
    assert 0 not in selected(r.experts)  # the single highest score is excluded
    g = gates_by_expert(r)
    for e, frac in {3: 14 / 55, 4: 13 / 55, 6: 16 / 55, 7: 12 / 55}.items():
        assert math.isclose(g[e], 2.5 * frac, abs_tol=2e-6)
    assert math.isclose(float(r.weights.sum()), 2.5, rel_tol=1e-6)


def test_example3_v2_rule_gives_the_other_answer() -> None:
    r = route(row(EX3_LOGITS), ex3_cfg(group_score="max"))
    assert selected(r.experts) == {0, 6, 7, 8}


# ---------------------------------------------------------------- Examples 4 and 5

EX4_BIAS = torch.tensor([0.30, 0, 0, -0.20, 0, 0, 0, 0, 0, 0, 0, 0])
EX4_GATES = {0: 2.5 * 19 / 52, 6: 2.5 * 4 / 13, 7: 2.5 * 3 / 13, 8: 2.5 * 5 / 52}


def test_example4_bias_selects_and_ranks_nodes_but_not_gates() -> None:
    cfg = ex3_cfg()
    key = selection_key(row(EX3_SCORES), EX4_BIAS, cfg)
    assert torch.allclose(key[0, [0, 3]], torch.tensor([1.25, 0.50]))
    assert group_mask(key, cfg).tolist() == [[True, False, True, False]]
    r = route(row(EX3_LOGITS), cfg, EX4_BIAS)
    assert selected(r.experts) == {0, 6, 7, 8}
    g = gates_by_expert(r)
    for e, value in EX4_GATES.items():
        assert math.isclose(g[e], value, abs_tol=2e-6)
    # Wrong answer: normalizing the biased scores.
    wrong = {0: 0.431034, 6: 0.275862, 7: 0.206897, 8: 0.086207}
    assert all(abs(g[e] / 2.5 - wrong[e]) > 1e-3 for e in wrong)
    # Invariance: a constant added to every bias changes nothing.
    shifted = route(row(EX3_LOGITS), cfg, EX4_BIAS + 0.37)
    assert torch.equal(shifted.experts, r.experts)
    assert torch.equal(shifted.weights, r.weights)


def test_example5_gate_independent_of_how_the_expert_got_in() -> None:
    """The V2 rule without bias selects the same set {0, 6, 7, 8} as Example 4 with bias:
    the gates must be identical (they depend only on s and the set)."""
    via_bias = route(row(EX3_LOGITS), ex3_cfg(), EX4_BIAS)
    no_bias = route(row(EX3_LOGITS), ex3_cfg(group_score="max"))
    assert selected(no_bias.experts) == selected(via_bias.experts) == {0, 6, 7, 8}
    a, b = gates_by_expert(via_bias), gates_by_expert(no_bias)
    for e in a:
        assert math.isclose(a[e], b[e], rel_tol=1e-6)
    assert math.isclose(a[0], 2.5 * 0.95 / 2.60, abs_tol=2e-6)


# ---------------------------------------------------------------- Example 6


def test_example6_minus_inf_mask() -> None:
    cfg = ex3_cfg()
    bias_E = torch.tensor(EX6_BIAS)
    logits_TE = logit_of(EX6_SCORES)
    key = selection_key(scores(logits_TE, "sigmoid"), bias_E, cfg)
    assert group_mask(key, cfg).tolist() == [[False, True, True, False]]
    r = route(logits_TE, cfg, bias_E)
    assert selected(r.experts) == {3, 4, 6, 7}
    g = gates_by_expert(r)
    for e, frac in {3: 14 / 45, 4: 8 / 45, 6: 16 / 45, 7: 7 / 45}.items():
        assert math.isclose(g[e], 2.5 * frac, abs_tol=2e-6)
    layout = Layout.contiguous(12, num_nodes=4, gpus_per_node=1)
    assert groups_per_token(r.experts, layout.node_of_expert).tolist() == [2]


def test_example6_zero_mask_is_the_wrong_answer() -> None:
    """Filling dropped nodes with 0.0 (the pre-1398800 code) picks {6, 3, 0, 1} and spans
    3 nodes; route() must not produce it."""
    cfg = ex3_cfg()
    key = selection_key(scores(logit_of(EX6_SCORES), "sigmoid"), torch.tensor(EX6_BIAS), cfg)
    keep_TE = group_mask(key, cfg).repeat_interleave(3, dim=1)
    zero_masked = key.masked_fill(~keep_TE, 0.0)
    wrong_TK = torch.sort(zero_masked, descending=True, stable=True).indices[:, :4]
    assert selected(wrong_TK) == {6, 3, 0, 1}
    assert groups_per_token(wrong_TK, cfg.group_of_expert()).item() == 3
    r = route(logit_of(EX6_SCORES), cfg, torch.tensor(EX6_BIAS))
    assert selected(r.experts) != selected(wrong_TK)


# ---------------------------------------------------------------- ties, order, dtypes, grads


def test_ties_lower_index_wins_for_experts() -> None:
    cfg = RouterConfig(num_experts=10, top_k=4, score_fn="softmax")
    assert route(torch.zeros(3, 10), cfg).experts.tolist() == [[0, 1, 2, 3]] * 3
    logits_TE = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    assert route(logits_TE, cfg).experts.tolist() == [[1, 2, 4, 0]]


def test_ties_lower_index_wins_for_groups() -> None:
    """Groups 1, 2, 3 tie on every rule; groups 1 and 2 (lower indices) are kept."""
    s_TE = torch.tensor([[0.1, 0.0, 0.5, 0.2, 0.5, 0.2, 0.5, 0.2]])
    for rule in ("max", "top2_sum", "topk_sum"):
        cfg = RouterConfig(8, 3, "sigmoid", num_groups=4, group_limit=2, group_score=rule)
        assert group_mask(s_TE, cfg).tolist() == [[False, True, True, False]]
        assert select_experts(s_TE, cfg).tolist() == [[2, 4, 3]]


def test_experts_ordered_by_descending_key() -> None:
    logits_TE = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    bias_E = torch.randn(32, generator=torch.Generator().manual_seed(1))
    cfg = RouterConfig(32, 6, "sigmoid", num_groups=8, group_limit=3, group_score="top2_sum")
    r = route(logits_TE, cfg, bias_E)
    key_TK = (r.scores + bias_E).gather(1, r.experts)
    assert bool((key_TK[:, :-1] > key_TK[:, 1:]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_scores_and_weights_are_float32(dtype: torch.dtype) -> None:
    logits_TE = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    for score_fn in ("softmax", "sigmoid"):
        r = route(logits_TE, RouterConfig(8, 2, score_fn, normalize=True))
        assert r.scores.dtype == r.weights.dtype == torch.float32
        assert r.experts.dtype == torch.int64
        assert torch.equal(r.scores, scores(logits_TE.float(), score_fn))


def test_weights_differentiable_wrt_logits_and_not_bias() -> None:
    gen = torch.Generator().manual_seed(3)
    logits_TE = torch.randn(8, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    bias_E = torch.randn(12, generator=gen, requires_grad=True)
    cfg = ex3_cfg()
    r = route(logits_TE, cfg, bias_E)
    (grad_w,) = torch.autograd.grad(r.weights.pow(2).sum(), logits_TE, retain_graph=True)
    # Independent formula: normalized sigmoid of the selected logits, times 2.5.
    s_TK = torch.sigmoid(logits_TE.float()).gather(1, r.experts)
    expected = (2.5 * s_TK / s_TK.sum(dim=1, keepdim=True)).pow(2).sum()
    (grad_ref,) = torch.autograd.grad(expected, logits_TE)
    assert torch.allclose(grad_w, grad_ref, atol=1e-6)
    assert grad_w.abs().sum() > 0
    assert torch.autograd.grad(r.weights.sum(), bias_E, allow_unused=True) == (None,)
    assert r.scores.requires_grad


def test_normalize_without_epsilon_and_underflow_gives_zero_gates() -> None:
    cfg = RouterConfig(4, 2, "sigmoid", normalize=True)
    s_TE = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.0, 0.0, 0.5, 0.5]])
    w_TK = gate_weights(s_TE, torch.tensor([[3, 1], [0, 1]]), cfg)
    total = torch.tensor(0.4) + torch.tensor(0.3)  # exact float32 sum, nothing added
    assert w_TK[0].tolist() == [
        (torch.tensor(0.4) / total).item(),
        (torch.tensor(0.3) / total).item(),
    ]
    assert w_TK[1].tolist() == [0.0, 0.0]


def test_empty_batch() -> None:
    r = route(torch.zeros(0, 12), ex3_cfg(), torch.zeros(12))
    assert r.experts.shape == r.weights.shape == (0, 4)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(num_experts=8, top_k=9, score_fn="softmax"), ["top_k=9", "num_experts=8", "1..8"]),
        (dict(num_experts=0, top_k=1, score_fn="softmax"), ["num_experts=0", ">= 1"]),
        (dict(num_experts=8, top_k=0, score_fn="softmax"), ["top_k=0", ">= 1"]),
        (dict(num_experts=8, top_k=2, score_fn="relu"), ["score_fn='relu'", "'softmax'"]),
        (
            dict(num_experts=8, top_k=2, score_fn="softmax", num_groups=4, group_limit=5),
            ["group_limit=5", "num_groups=4", "1..4"],
        ),
        (
            dict(num_experts=10, top_k=2, score_fn="softmax", num_groups=4),
            ["num_experts=10", "num_groups=4", "[1, 2, 5, 10]"],
        ),
        (
            dict(num_experts=8, top_k=5, score_fn="softmax", num_groups=4, group_limit=2),
            ["top_k=5", "2 x 2 = 4", "1..4"],
        ),
        (
            dict(num_experts=8, top_k=2, score_fn="softmax", num_groups=2, group_score="mean"),
            ["group_score='mean'", "'top2_sum'"],
        ),
        (
            dict(
                num_experts=8,
                top_k=2,
                score_fn="softmax",
                num_groups=8,
                group_limit=2,
                group_score="top2_sum",
            ),
            ["group_score='top2_sum'", "got 1", "'max'"],
        ),
        (
            dict(
                num_experts=8,
                top_k=2,
                score_fn="softmax",
                num_groups=4,
                group_limit=3,
                group_score="topk_sum",
            ),
            ["group_score='topk_sum'", "2 // 3 = 0", "top_k >= group_limit"],
        ),
        (dict(num_experts=8, top_k=2, score_fn="sigmoid", bias_mode="exp"), ["bias_mode='exp'"]),
        (dict(num_experts=8, top_k=2, score_fn="sigmoid", route_scale=0.0), ["route_scale=0.0"]),
        (dict(num_experts=8, top_k=2, score_fn="sigmoid", route_scale=-1), ["route_scale=-1"]),
        (
            dict(num_experts=8, top_k=2, score_fn="sigmoid", route_scale=float("nan")),
            ["route_scale=nan", "finite"],
        ),
        (dict(num_experts=8, top_k=True, score_fn="sigmoid"), ["top_k=True"]),
        (dict(num_experts=8, top_k=2, score_fn="sigmoid", normalize=1), ["normalize=1"]),
    ],
)
def test_router_config_rejects(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        RouterConfig(**kwargs)
    assert "allowed" in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_group_limit_ignored_without_groups() -> None:
    """num_groups=1 means no limit; group_limit is then ignored (docs/routing.md §5)."""
    cfg = RouterConfig(16, 4, "softmax", num_groups=1, group_limit=2)
    assert not cfg.group_limited
    logits_TE = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        route(logits_TE, cfg).experts, route(logits_TE, RouterConfig(16, 4, "softmax")).experts
    )


def test_defaults_a_peers_user_expects() -> None:
    """Unset fields: softmax, no group limit, gates normalised for sigmoid with K > 1 only
    (docs/routing.md §3, §5)."""
    plain = RouterConfig(8, 2)
    assert (plain.score_fn, plain.num_groups, plain.group_limit) == ("softmax", 1, 1)
    assert plain.normalize is False and not plain.group_limited
    assert RouterConfig(8, 2, "sigmoid").normalize is True
    assert RouterConfig(8, 1, "sigmoid").normalize is False  # one normalised gate is 1
    assert RouterConfig(8, 2, "sigmoid", normalize=False).normalize is False
    assert RouterConfig(8, 2, "sigmoid") == RouterConfig(8, 2, "sigmoid", normalize=True)


def test_unset_group_limit_is_no_limit() -> None:
    """`RouterConfig(num_groups=8)` alone keeps all 8 groups: plain top-K."""
    logits_TE = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    cfg = RouterConfig(16, 4, "sigmoid", num_groups=8)
    assert cfg.group_limit == 8 and not cfg.group_limited
    plain = RouterConfig(16, 4, "sigmoid")
    assert torch.equal(route(logits_TE, cfg).experts, route(logits_TE, plain).experts)


@pytest.mark.parametrize("rule", ["max", "top2_sum", "topk_sum"])
def test_m_equal_g_with_k_below_m_is_plain_top_k(rule: str) -> None:
    """M = G limits nothing, so K < M (topk_sum: K // M = 0) and one expert per group
    (top2_sum) are accepted and give plain top-K."""
    logits_TE = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    cfg = RouterConfig(8, 2, "softmax", num_groups=8, group_limit=8, group_score=rule)
    assert not cfg.group_limited
    assert torch.equal(route(logits_TE, cfg).experts, route(logits_TE, RouterConfig(8, 2)).experts)


@pytest.mark.parametrize(
    ("logits", "fragment"),
    [
        (torch.tensor([[0.0, float("nan")] + [0.0] * 10]), "NaN or inf"),
        (torch.tensor([[0.0, float("inf")] + [0.0] * 10]), "NaN or inf"),
        (torch.tensor([[0.0, float("-inf")] + [0.0] * 10]), "NaN or inf"),
        (torch.zeros(12), "shape=(12,)"),
        (torch.zeros(3, 11), "(T, 12)"),
        (torch.zeros(3, 12, dtype=torch.int64), "dtype=torch.int64"),
    ],
)
def test_route_rejects_bad_logits(logits: torch.Tensor, fragment: str) -> None:
    with pytest.raises(ValueError, match="allowed") as err:
        route(logits, ex3_cfg())
    assert fragment in str(err.value)
    assert "logits_TE" in str(err.value)


def test_route_rejects_bad_bias() -> None:
    with pytest.raises(ValueError, match=r"bias_E shape=\(11,\).*\(12,\)"):
        route(torch.zeros(2, 12), ex3_cfg(), torch.zeros(11))
    with pytest.raises(ValueError, match="bias_E contains NaN"):
        route(torch.zeros(2, 12), ex3_cfg(), torch.full((12,), float("nan")))


def test_scores_rejects_unknown_fn() -> None:
    with pytest.raises(ValueError, match=r"score_fn='tanh'.*'sigmoid'"):
        scores(torch.zeros(1, 4), "tanh")


# ---------------------------------------------------------------- presets


EXPECTED_PRESETS = {
    "switch": dict(num_experts=64, top_k=1, score_fn="softmax", normalize=False, route_scale=1.0),
    "gshard": dict(num_experts=64, top_k=2, score_fn="softmax", normalize=True, route_scale=1.0),
    "v2": dict(
        num_experts=160, top_k=6, score_fn="softmax", num_groups=8, group_limit=3,
        group_score="max", normalize=False, route_scale=16.0,
    ),
    "v2-lite": dict(
        num_experts=64, top_k=6, score_fn="softmax", num_groups=1, normalize=False,
        route_scale=1.0,
    ),
    "v3": dict(
        num_experts=256, top_k=8, score_fn="sigmoid", num_groups=8, group_limit=4,
        group_score="top2_sum", normalize=True, route_scale=2.5, bias_mode="add",
    ),
    "wang": dict(
        num_experts=64, top_k=6, score_fn="sigmoid", num_groups=1, normalize=False,
        route_scale=1.0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_presets(name: str) -> None:
    cfg = preset(name)
    for field, value in EXPECTED_PRESETS[name].items():
        assert getattr(cfg, field) == value, field
    r = route(torch.randn(5, cfg.num_experts, generator=torch.Generator().manual_seed(0)), cfg)
    assert r.experts.shape == (5, cfg.top_k)


def test_preset_names_and_docs() -> None:
    assert set(PRESETS) == set(EXPECTED_PRESETS)
    assert "UNVERIFIED" in (preset.__doc__ or "")
    v3 = preset("v3")
    assert v3.experts_per_group == 32 and v3.group_topk == 2 and v3.group_limited
    assert preset("v2").experts_per_group == 20


def test_preset_overrides_and_errors() -> None:
    assert preset("v3", num_experts=16, top_k=4).experts_per_group == 2
    assert preset("v3", bias_mode="mul").bias_mode == "mul"
    with pytest.raises(ValueError, match=r"name='v4'.*'switch'.*'v2-lite'.*'wang'"):
        preset("v4")
    with pytest.raises(ValueError, match=r"override top_n= .*top_k"):
        preset("v3", top_n=2)
    with pytest.raises(ValueError, match=r"group_limit=9 exceeds num_groups=8"):
        preset("v2", group_limit=9)
    with pytest.raises(ValueError, match=r"top_k=300 exceeds num_experts=256"):
        preset("v3", top_k=300)


def test_router_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("v3").top_k = 2  # type: ignore[misc]


# ---------------------------------------------------------------- Layout


def test_layout_contiguous() -> None:
    layout = Layout.contiguous(16, num_nodes=2, gpus_per_node=4)
    assert layout.num_devices == 8 and layout.experts_per_device == 2
    assert layout.experts_per_node == 8
    assert layout.device_of_expert.tolist() == [i // 2 for i in range(16)]
    assert layout.node_of_expert.tolist() == [i // 8 for i in range(16)]
    assert layout.node_of_device.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.placement == tuple(range(16))
    assert layout == Layout(16, 2, 4, placement=list(range(16)))
    assert hash(layout) == hash(Layout(16, 2, 4))
    # V3-style: routing groups = nodes coincide with the layout.
    v3_small = preset("v3", num_experts=16, num_groups=2, group_limit=1, top_k=4)
    assert torch.equal(layout.node_of_expert, v3_small.group_of_expert())


def test_layout_permutation() -> None:
    placement = [3, 0, 1, 2, 7, 6, 5, 4]  # expert i sits in slot placement[i]
    layout = Layout(8, num_nodes=2, gpus_per_node=2, placement=torch.tensor(placement))
    assert layout.device_of_expert.tolist() == [p // 2 for p in placement]
    assert layout.node_of_expert.tolist() == [p // 4 for p in placement]
    assert layout != Layout.contiguous(8, 2, 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((10, 2, 2), {}, "num_experts=10 is not divisible"),
        ((8, 0, 2), {}, "num_nodes=0"),
        ((8, 2, -1), {}, "gpus_per_node=-1"),
        ((4, 1, 2), {"placement": [0, 1, 1, 2]}, "permutation of 0..3"),
        ((4, 1, 2), {"placement": [0, 1, 2]}, "permutation of 0..3"),
        ((4, 1, 2), {"placement": [0.0, 1.0, 2.0, 3.0]}, "permutation of 0..3"),
    ],
)
def test_layout_rejects(args: tuple, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match="allowed") as err:
        Layout(*args, **kwargs)
    assert fragment in str(err.value)
