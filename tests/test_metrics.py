"""Tests of moebench.metrics: docs/balancing.md §10 L4 MaxVio numbers, load counting with drops,
groups per token against a Python reference, and MaxVio properties (docs/balancing.md §11.6).

Legend: T tokens, K experts per token, E routed experts, L layers.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.metrics import (
    dropped_frac,
    expert_load,
    groups_per_token,
    max_vio,
    max_vio_layers,
)
from moebench.routing import Layout

SETTINGS = settings(max_examples=150, deadline=None)


def test_l4_max_vio_numbers() -> None:
    """docs/balancing.md §10, L4: batch MaxVio 1.0 and 0.5 (mean 0.75), global MaxVio 0.25."""
    assert max_vio(torch.tensor([12, 6, 3, 3])) == 1.0
    a, b = torch.tensor([8, 4, 2, 2]), torch.tensor([2, 4, 6, 4])
    assert max_vio(a) == 1.0 and max_vio(b) == 0.5
    assert max_vio(a + b) == 0.25  # global loads [10, 8, 8, 6]
    assert max_vio_layers(torch.stack([a, b])) == 0.75
    # Global and mean-batch MaxVio are different metrics.
    assert max_vio(a + b) != max_vio_layers(torch.stack([a, b]))


def test_max_vio_rejects() -> None:
    with pytest.raises(ValueError, match=r"mean 0.0.*positive"):
        max_vio(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"load_E shape=\(2, 2\).*\[E\]"):
        max_vio(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"load_LE shape=\(4,\).*\[L, E\]"):
        max_vio_layers(torch.ones(4))


def test_expert_load_excludes_dropped() -> None:
    experts_TK = torch.tensor([[0, 1], [1, 3], [1, 0]])
    keep_TK = torch.tensor([[True, False], [True, True], [False, True]])
    assert expert_load(experts_TK, 5).tolist() == [2, 3, 0, 1, 0]
    load_E = expert_load(experts_TK, 5, keep_TK)
    assert load_E.tolist() == [2, 1, 0, 1, 0] and load_E.dtype == torch.int64
    assert dropped_frac(keep_TK) == 2 / 6
    assert dropped_frac(torch.ones(3, 2, dtype=torch.bool)) == 0.0


def test_expert_load_rejects() -> None:
    experts_TK = torch.tensor([[0, 4]])
    with pytest.raises(ValueError, match=r"ids in \[0, 4\].*0\.\.3 \(num_experts=4\)"):
        expert_load(experts_TK, 4)
    with pytest.raises(ValueError, match=r"keep_TK dtype=torch.int64.*torch.bool of shape"):
        expert_load(experts_TK, 5, torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"keep_TK .*shape=\(2,\).*\(1, 2\)"):
        expert_load(experts_TK, 5, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"experts_TK dtype=torch.float32.*integer tensor"):
        expert_load(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match=r"keep_TK .*non-empty torch.bool"):
        dropped_frac(torch.zeros(0, 2, dtype=torch.bool))


def test_groups_per_token_with_layout() -> None:
    layout = Layout.contiguous(8, num_nodes=2, gpus_per_node=2)
    experts_TK = torch.tensor([[0, 1, 2], [0, 4, 7], [3, 2, 1], [6, 7, 5]])
    assert groups_per_token(experts_TK, layout.device_of_expert).tolist() == [2, 3, 2, 2]
    assert groups_per_token(experts_TK, layout.node_of_expert).tolist() == [1, 2, 1, 1]


@st.composite
def assignments(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """experts_TK (distinct per token), keep_TK and E."""
    E = draw(st.integers(1, 24))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 12))
    rows = [draw(st.permutations(range(E)))[:K] for _ in range(T)]
    keep = [[draw(st.booleans()) for _ in range(K)] for _ in range(T)]
    return torch.tensor(rows), torch.tensor(keep), E


@SETTINGS
@given(assignments(), st.integers(1, 6), st.randoms(use_true_random=False))
def test_counts_and_groups_match_python(
    case: tuple[torch.Tensor, torch.Tensor, int], num_groups: int, rnd
) -> None:
    experts_TK, keep_TK, E = case
    load_E = expert_load(experts_TK, E, keep_TK)
    expected = [0] * E
    for row, keep in zip(experts_TK.tolist(), keep_TK.tolist(), strict=True):
        for e, k in zip(row, keep, strict=True):
            expected[e] += k
    assert load_E.tolist() == expected
    assert int(load_E.sum()) + round(dropped_frac(keep_TK) * keep_TK.numel()) == keep_TK.numel()
    group_of_expert_E = torch.tensor([rnd.randrange(num_groups) for _ in range(E)])
    counts_T = groups_per_token(experts_TK, group_of_expert_E)
    assert counts_T.dtype == torch.int64
    assert counts_T.tolist() == [
        len({group_of_expert_E[e].item() for e in row}) for row in experts_TK.tolist()
    ]


@SETTINGS
@given(st.lists(st.lists(st.integers(0, 50), min_size=4, max_size=4), min_size=1, max_size=6))
def test_max_vio_properties(batches: list[list[int]]) -> None:
    """MaxVio >= 0, = 0 iff balanced; global MaxVio <= token-weighted mean batch MaxVio."""
    loads_BE = torch.tensor(batches)
    nonempty = loads_BE.sum(dim=1) > 0
    for load_E in loads_BE[nonempty]:
        v = max_vio(load_E)
        assert v >= 0 and (v == 0) == bool((load_E == load_E[0]).all())
    if nonempty.any():
        kept_BE = loads_BE[nonempty]
        tokens_B = kept_BE.sum(dim=1).double()
        weighted = sum(
            w * max_vio(load_E) for w, load_E in zip(tokens_B.tolist(), kept_BE, strict=True)
        ) / float(tokens_B.sum())
        assert max_vio(kept_BE.sum(dim=0)) <= weighted + 1e-12
        assert math.isclose(
            max_vio_layers(kept_BE), sum(max_vio(x) for x in kept_BE) / len(kept_BE)
        )
