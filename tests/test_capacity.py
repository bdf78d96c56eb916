"""Capacity and token dropping: example D1 of docs/balancing.md §10 (V2 device-level dropping, with
and without a protected sequence), Switch capacity rounding, both drop policies, exact drop
counts, and argument errors."""

from __future__ import annotations

import pytest
import torch

from moebench.balancing import (
    device_drop,
    drop_by_capacity,
    expert_capacity,
    protected_sequences,
)
from moebench.metrics import dropped_frac, expert_load

# D1: D = 2 (d0 = {e0, e1}, d1 = {e2, e3}), K = 2, sequences A = (t0, t1), B = (t2, t3)
D1_EXPERTS = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 3]])
D1_AFFINITY = torch.tensor([[0.50, 0.30], [0.45, 0.25], [0.40, 0.20], [0.35, 0.15]])
D1_DEVICE = torch.tensor([0, 0, 1, 1])


def dropped(keep_TK: torch.Tensor) -> set[tuple[int, int]]:
    """(token, expert) pairs that were dropped."""
    return {(t, int(D1_EXPERTS[t, k])) for t, k in (~keep_TK).nonzero().tolist()}


def test_d1_no_protected_sequence() -> None:
    keep_TK = device_drop(D1_EXPERTS, D1_AFFINITY, D1_DEVICE, factor=1.0)
    assert dropped(keep_TK) == {(2, 0), (0, 1)}  # affinities 0.20 and 0.30 on d0
    assert int((~keep_TK).sum()) == 2
    assert dropped_frac(keep_TK) == 0.25


def test_d1_sequence_b_protected() -> None:
    protected_T = torch.tensor([False, False, True, True])
    keep_TK = device_drop(D1_EXPERTS, D1_AFFINITY, D1_DEVICE, 1.0, protected_T)
    assert dropped(keep_TK) == {(0, 1), (1, 0)}  # B's three d0 assignments stay
    assert bool(keep_TK[2:].all())


def test_d1_under_budget_device_keeps_everything_and_scores_te_work() -> None:
    # d1 receives 2 of its budget of 4: nothing dropped there, nothing re-routed to it
    keep_TK = device_drop(D1_EXPERTS, D1_AFFINITY, D1_DEVICE, 1.0)
    assert bool(keep_TK[D1_DEVICE[D1_EXPERTS] == 1].all())
    scores_TE = torch.zeros(4, 4).scatter(1, D1_EXPERTS, D1_AFFINITY)
    assert torch.equal(device_drop(D1_EXPERTS, scores_TE, D1_DEVICE, 1.0), keep_TK)
    # a generous factor drops nothing
    assert bool(device_drop(D1_EXPERTS, D1_AFFINITY, D1_DEVICE, 1.5).all())


def test_expert_capacity_rounding() -> None:
    assert expert_capacity(10, 4, 2, 1.25) == 7  # 6.25 -> ceil
    assert expert_capacity(16, 4, 2, 1.0) == 8
    assert expert_capacity(10, 1, 1, 1.1) == 11  # float 10 * 1.1 = 11.000000000000002
    assert expert_capacity(0, 4, 2, 1.0) == 0


def test_drop_by_probs_drops_lowest_affinity_first() -> None:
    experts_TK = torch.tensor([[0], [0], [0], [1]])
    weights_TK = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    keep_TK = drop_by_capacity(experts_TK, weights_TK, capacity=2, policy="probs")
    assert keep_TK.flatten().tolist() == [False, True, True, True]
    scores_TE = torch.tensor([[0.2, 0.0], [0.9, 0.0], [0.5, 0.0], [0.0, 0.1]])
    assert torch.equal(drop_by_capacity(experts_TK, scores_TE, 2, "probs"), keep_TK)


def test_drop_by_position_drops_later_tokens_first() -> None:
    experts_TK = torch.tensor([[0, 1], [1, 0], [0, 2]])
    keep_TK = drop_by_capacity(experts_TK, None, capacity=2, policy="position")
    assert keep_TK.tolist() == [[True, True], [True, True], [False, True]]
    assert expert_load(experts_TK, 3, keep_TK).tolist() == [2, 2, 1]


def test_ties_drop_the_later_token() -> None:
    experts_TK = torch.tensor([[0], [0], [0]])
    keep_TK = drop_by_capacity(experts_TK, torch.full((3, 1), 0.5), 1, "probs")
    assert keep_TK.flatten().tolist() == [True, False, False]


def test_protected_sequences_is_seeded_per_sequence() -> None:
    mask = protected_sequences(4000, 40, 0.1, torch.Generator().manual_seed(7))
    per_seq = mask.reshape(100, 40)
    assert bool((per_seq.all(dim=1) | ~per_seq.any(dim=1)).all())  # whole sequences
    again = protected_sequences(4000, 40, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(mask, again)
    assert 2 <= int(per_seq[:, 0].sum()) <= 25  # Bernoulli(0.1) over 100 sequences
    assert not bool(protected_sequences(80, 8, 0.0).any())
    assert bool(protected_sequences(80, 8, 1.0).all())


def test_capacity_argument_errors() -> None:
    e_TK, w_TK = D1_EXPERTS, D1_AFFINITY
    cases = [
        (lambda: expert_capacity(8, 4, 2, 0.0), "factor=0.0"),
        (lambda: expert_capacity(8, 4, 2, -1.0), "factor=-1.0"),
        (lambda: expert_capacity(8, 4, 2, float("nan")), "factor=nan"),
        (lambda: expert_capacity(8, 4, 5, 1.0), "top_k=5"),
        (lambda: expert_capacity(-1, 4, 2, 1.0), "num_tokens=-1"),
        (lambda: drop_by_capacity(e_TK, w_TK, -1), "capacity=-1"),
        (lambda: drop_by_capacity(e_TK, w_TK, 2, "random"), "policy='random'"),  # type: ignore[arg-type]
        (lambda: drop_by_capacity(e_TK, None, 2, "probs"), "affinity=None"),
        (lambda: drop_by_capacity(e_TK, w_TK[:3], 2), "affinity has shape"),
        (lambda: drop_by_capacity(e_TK, w_TK * float("nan"), 2), "affinity contains NaN"),
        (lambda: device_drop(e_TK, w_TK, D1_DEVICE, 0.0), "factor=0.0"),
        (lambda: device_drop(e_TK, w_TK, D1_DEVICE, float("nan")), "factor=nan"),
        (lambda: device_drop(e_TK, w_TK, D1_DEVICE[:3], 1.0), "experts_TK"),
        (lambda: device_drop(e_TK, w_TK, D1_DEVICE, 1.0, torch.ones(4)), "protected_T"),
        (lambda: protected_sequences(10, 3, 0.1), "seq_len=3"),
        (lambda: protected_sequences(10, 5, 1.5), "fraction=1.5"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match="allowed") as info:
            call()
        assert fragment in str(info.value)
