"""Hypothesis property tests of docs/balancing.md §11 (losses, bias update, MaxVio), exact drop
counts. Random tensors come from a torch generator seeded by hypothesis, so every failure
replays from its printed example."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.balancing import (
    comm_loss,
    device_drop,
    device_loss,
    drop_by_capacity,
    expert_capacity,
    expert_loss,
    global_loss,
    seq_loss,
    switch_loss,
    update_bias,
)
from moebench.metrics import max_vio

F64 = torch.float64
PROPS = settings(max_examples=60, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def close(value: torch.Tensor, expected: float) -> bool:
    return abs(float(value) - expected) <= 1e-12 * max(1.0, abs(expected))


def random_distinct_experts(g: torch.Generator, T: int, E: int, K: int) -> torch.Tensor:
    """K distinct experts per token, uniformly at random, [T, K]."""
    return torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]


@st.composite
def balanced_case(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(E, K, D, B, S) with D | E and E | S*K, so a round-robin routing is exactly balanced
    per sequence."""
    D = draw(st.integers(1, 4))
    E = D * draw(st.integers(1, 4))
    K = draw(st.integers(1, E))
    S = E * draw(st.integers(1, 3))  # E | S*K whatever K is
    B = draw(st.integers(1, 3))
    return E, K, D, B, S


def round_robin(T: int, E: int, K: int) -> torch.Tensor:
    """Token t takes experts (t*K + j) mod E: K distinct experts, equal counts if E | T*K."""
    return (torch.arange(T).unsqueeze(1) * K + torch.arange(K)) % E


# ----------------------------------------------------------------------------- §11.1


@PROPS
@given(balanced_case())
def test_balanced_counts_and_uniform_scores_give_one(case: tuple[int, ...]) -> None:
    E, K, D, B, S = case
    T = B * S
    experts_TK = round_robin(T, E, K)
    uniform_TE = torch.full((T, E), 1.0 / E, dtype=F64)
    sigmoid_TE = torch.full((T, E), 0.3, dtype=F64)
    device_E = torch.arange(E) // (E // D)
    for loss in (
        switch_loss(uniform_TE, experts_TK),
        expert_loss(uniform_TE, experts_TK, S),
        device_loss(uniform_TE, experts_TK, device_E, S),
        seq_loss(sigmoid_TE, experts_TK, S),
        global_loss(sigmoid_TE, experts_TK),
    ):
        assert close(loss, 1.0)


@PROPS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_comm_loss_is_one_when_every_device_receives_mt_over_d(
    D: int, experts_per_device: int, B: int, reps: int
) -> None:
    # K = M: each token picks one expert on each of M distinct devices, round robin over devices
    M = (reps % D) + 1
    S = D * reps
    T = B * S
    devices_TM = (torch.arange(T).unsqueeze(1) * M + torch.arange(M)) % D
    experts_TM = devices_TM * experts_per_device + torch.arange(T).unsqueeze(1) % experts_per_device
    E = D * experts_per_device
    loss = comm_loss(
        torch.full((T, E), 1.0 / E, dtype=F64),
        experts_TM,
        torch.arange(E) // experts_per_device,
        M,
        S,
    )
    assert close(loss, 1.0)


# ----------------------------------------------------------------------------- §11.2, §11.3


@PROPS
@given(balanced_case(), seeds)
def test_sum_of_p_is_one(case: tuple[int, ...], seed: int) -> None:
    # with every f_i = 1 the loss is sum_i P_i: 1 for softmax scores and for s' (eq. 19)
    E, K, _, B, S = case
    T = B * S
    g = torch.Generator().manual_seed(seed)
    logits_TE = 3 * torch.randn(T, E, generator=g, dtype=F64)
    experts_TK = round_robin(T, E, K)
    assert close(expert_loss(torch.softmax(logits_TE, -1), experts_TK, S), 1.0)
    assert close(seq_loss(torch.sigmoid(logits_TE), experts_TK, S), 1.0)


@PROPS
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 12), seeds)
def test_sum_of_f_is_num_experts(E: int, B: int, S: int, seed: int) -> None:
    # with every P_i = 1/E the loss is sum_i f_i / E: 1 iff sum_i f_i = E, for ANY selection
    g = torch.Generator().manual_seed(seed)
    K = 1 + seed % E
    experts_TK = random_distinct_experts(g, B * S, E, K)
    constant_TE = torch.full((B * S, E), 0.7, dtype=F64)
    assert close(seq_loss(constant_TE, experts_TK, S), 1.0)


# ----------------------------------------------------------------------------- §11.4


@PROPS
@given(st.integers(2, 8), st.integers(1, 3), st.integers(1, 8), seeds)
def test_gradient_only_through_p(E: int, B: int, S: int, seed: int) -> None:
    # d loss / d s_{i,t} = f_i(seq of t) / (B S): independent of the scores, so f is a constant
    g = torch.Generator().manual_seed(seed)
    K = 1 + seed % E
    T = B * S
    scores_TE = torch.softmax(torch.randn(T, E, generator=g, dtype=F64), -1).requires_grad_()
    experts_TK = random_distinct_experts(g, T, E, K)
    expert_loss(scores_TE, experts_TK, S).backward()
    counts_BE = torch.stack(
        [torch.bincount(experts_TK[b * S : (b + 1) * S].flatten(), minlength=E) for b in range(B)]
    ).to(F64)
    f_BE = counts_BE * E / (K * S)
    expected_TE = (f_BE / (B * S)).repeat_interleave(S, dim=0)
    torch.testing.assert_close(scores_TE.grad, expected_TE, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- §11.5

loads = st.lists(st.integers(0, 50), min_size=1, max_size=12)


@PROPS
@given(loads, seeds, st.sampled_from(["sign", "proportional", "multiplicative"]))
def test_bias_update_is_permutation_equivariant(load: list[int], seed: int, rule: str) -> None:
    g = torch.Generator().manual_seed(seed)
    load_E = torch.tensor(load)
    bias_E = torch.randn(len(load), generator=g)
    perm = torch.randperm(len(load), generator=g)
    new_E = update_bias(bias_E, load_E, 1e-3, rule)  # type: ignore[arg-type]
    permuted = update_bias(bias_E[perm], load_E[perm], 1e-3, rule)  # type: ignore[arg-type]
    assert torch.equal(permuted, new_E[perm])


@PROPS
@given(loads, st.sampled_from(["sign", "proportional"]))
def test_bias_update_is_antisymmetric(load: list[int], rule: str) -> None:
    # reflecting the loads about their mean (c -> 2 c_bar - c) reverses every step
    load_E = torch.tensor(load, dtype=F64)
    mirrored_E = 2 * load_E.mean() - load_E
    if bool((mirrored_E < 0).any()):
        mirrored_E = mirrored_E - mirrored_E.min()  # a common shift keeps e_i for "sign"
        if rule == "proportional":
            return
    zeros_E = torch.zeros(len(load))
    step = update_bias(zeros_E, load_E, 1e-2, rule)  # type: ignore[arg-type]
    reverse = update_bias(zeros_E, mirrored_E, 1e-2, rule)  # type: ignore[arg-type]
    torch.testing.assert_close(reverse, -step, rtol=1e-6, atol=1e-9)


@PROPS
@given(loads, st.floats(1e-5, 1.0))
def test_sign_step_is_exactly_gamma_or_zero(load: list[int], rate: float) -> None:
    new_E = update_bias(torch.zeros(len(load)), torch.tensor(load), rate)
    gamma = torch.tensor(rate, dtype=torch.float32)
    mean = sum(load) / len(load)
    for value, count in zip(new_E, load, strict=True):
        expected = gamma if count < mean else -gamma if count > mean else 0 * gamma
        assert torch.equal(value, expected)


@PROPS
@given(st.integers(1, 12), st.integers(0, 30), seeds, st.sampled_from(["sign", "proportional"]))
def test_balanced_batch_leaves_bias_unchanged(E: int, count: int, seed: int, rule: str) -> None:
    bias_E = torch.randn(E, generator=torch.Generator().manual_seed(seed))
    new_E = update_bias(bias_E, torch.full((E,), count), 1e-3, rule)  # type: ignore[arg-type]
    assert torch.equal(new_E, bias_E)


# ----------------------------------------------------------------------------- §11.6


@PROPS
@given(st.lists(st.lists(st.integers(1, 20), min_size=4, max_size=4), min_size=1, max_size=5))
def test_maxvio_global_is_at_most_the_weighted_batch_mean(batches: list[list[int]]) -> None:
    loads_NE = torch.tensor(batches, dtype=F64)
    per_batch = torch.tensor([max_vio(b) for b in loads_NE], dtype=F64)
    weights = loads_NE.sum(dim=1) / loads_NE.sum()
    assert all(v >= 0 for v in per_batch)
    assert max_vio(loads_NE.sum(dim=0)) <= float((weights * per_batch).sum()) + 1e-12


# ----------------------------------------------------------------------------- drop counts


@PROPS
@given(
    st.integers(1, 40),
    st.integers(1, 8),
    st.floats(0.25, 2.0),
    st.sampled_from(["probs", "position"]),
    seeds,
)
def test_capacity_drops_exactly_the_overflow(
    T: int, E: int, factor: float, policy: str, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    K = 1 + seed % E
    experts_TK = random_distinct_experts(g, T, E, K)
    affinity_TK = torch.rand(T, K, generator=g).round(decimals=1)  # ties happen
    capacity = expert_capacity(T, E, K, factor)
    keep_TK = drop_by_capacity(experts_TK, affinity_TK, capacity, policy)  # type: ignore[arg-type]
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E)
    kept_E = torch.bincount(experts_TK[keep_TK], minlength=E)
    assert torch.equal(kept_E, counts_E.clamp(max=capacity))
    assert int((~keep_TK).sum()) == int((counts_E - capacity).clamp(min=0).sum())
    for e in range(E):
        mask_TK = experts_TK == e
        kept, lost = mask_TK & keep_TK, mask_TK & ~keep_TK
        if not bool(lost.any()) or not bool(kept.any()):
            continue
        if policy == "probs":
            assert float(affinity_TK[kept].min()) >= float(affinity_TK[lost].max())
        else:  # every kept token comes before every dropped one
            assert int(kept.nonzero()[:, 0].max()) <= int(lost.nonzero()[:, 0].min())


@PROPS
@given(st.integers(1, 30), st.integers(1, 4), st.integers(1, 3), st.floats(0.25, 2.0), seeds)
def test_device_drop_respects_budget_and_protection(
    T: int, D: int, experts_per_device: int, factor: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    E = D * experts_per_device
    K = 1 + seed % E
    experts_TK = random_distinct_experts(g, T, E, K)
    affinity_TK = torch.rand(T, K, generator=g)
    protected_T = torch.rand(T, generator=g) < 0.3
    device_E = torch.arange(E) // experts_per_device
    keep_TK = device_drop(experts_TK, affinity_TK, device_E, factor, protected_T)
    budget = math.ceil(Fraction(T * K, D) * Fraction(str(factor)))  # ceil(K T / D * factor)
    device_TK = device_E[experts_TK]
    protected_TK = protected_T.unsqueeze(1).expand(T, K)
    assert bool(keep_TK[protected_TK].all())
    for d in range(D):
        on_d = device_TK == d
        n_protected = int((on_d & protected_TK).sum())
        n_free = int((on_d & ~protected_TK).sum())
        kept_free = on_d & ~protected_TK & keep_TK
        lost = on_d & ~keep_TK
        assert int(kept_free.sum()) == max(0, min(n_free, budget - n_protected))
        if bool(lost.any()) and bool(kept_free.any()):
            assert float(affinity_TK[kept_free].min()) >= float(affinity_TK[lost].max())
