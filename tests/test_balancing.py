"""Auxiliary balance losses: the hand-worked examples L1-L3 of docs/balancing.md §10
(with exact fractions, in float64), the peer tests of docs/peers.md, and argument errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from moebench.balancing import (
    comm_loss,
    device_loss,
    expert_loss,
    global_loss,
    gshard_loss,
    literal_topk,
    seq_loss,
    switch_loss,
)
from moebench.routing import Layout

F64 = torch.float64

# L1: Switch, N = 4, T = 4, top-1
L1_P = torch.tensor(
    [
        [0.70, 0.10, 0.10, 0.10],
        [0.40, 0.30, 0.20, 0.10],
        [0.10, 0.60, 0.20, 0.10],
        [0.25, 0.15, 0.50, 0.10],
    ],
    dtype=F64,
)
# L2: V2, N_r = 6, D = 3, K_r = 2, M = 2, T = 4
L2_S = torch.tensor(
    [
        [0.30, 0.25, 0.20, 0.10, 0.10, 0.05],
        [0.05, 0.10, 0.40, 0.30, 0.10, 0.05],
        [0.35, 0.05, 0.05, 0.05, 0.40, 0.10],
        [0.10, 0.05, 0.05, 0.05, 0.40, 0.35],
    ],
    dtype=F64,
)
L2_DEVICE = torch.tensor([0, 0, 1, 1, 2, 2])
# L3: V3, N_r = 4, K_r = 2, T = 3 (sigmoid scores, rows do not sum to 1)
L3_S = torch.tensor(
    [[0.90, 0.60, 0.30, 0.20], [0.80, 0.70, 0.10, 0.40], [0.50, 0.10, 0.90, 0.30]], dtype=F64
)


def exact(value: torch.Tensor, fraction: Fraction) -> None:
    """`value` equals the exact fraction to float64 rounding."""
    assert float(value) == pytest.approx(float(fraction), rel=1e-13, abs=0)


def sets(experts_TK: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in experts_TK.tolist()]


# ----------------------------------------------------------------------------- L1


def test_l1_switch_loss() -> None:
    experts_TK = L1_P.argmax(dim=1, keepdim=True)
    assert experts_TK.flatten().tolist() == [0, 0, 1, 2]
    loss = switch_loss(L1_P, experts_TK)
    exact(loss, Fraction(101, 80))
    exact(0.01 * loss, Fraction(101, 8000))  # alpha = 0.01: 0.012625


def test_l1_gshard_forms() -> None:
    experts_TK = literal_topk(L1_P, 1)
    exact(gshard_loss(L1_P, experts_TK, form="paper"), Fraction(101, 1280))  # 0.07890625
    exact(gshard_loss(L1_P, experts_TK, form="code"), Fraction(101, 80))  # E^2 x paper = 1.2625
    # GShard counts only first choices: adding a second choice does not change it
    top2_TK = literal_topk(L1_P, 2)
    exact(gshard_loss(L1_P, top2_TK, form="paper"), Fraction(101, 1280))


# ----------------------------------------------------------------------------- L2


def test_l2_selection_and_expert_loss() -> None:
    experts_TK = literal_topk(L2_S, 2)
    assert sets(experts_TK) == [{0, 1}, {2, 3}, {0, 4}, {4, 5}]
    loss = expert_loss(L2_S, experts_TK)
    exact(loss, Fraction(87, 80))
    exact(0.003 * loss, Fraction(87, 80) * Fraction(3, 1000))  # 0.0032625


def test_l2_device_and_comm_losses_and_total() -> None:
    experts_TK = literal_topk(L2_S, 2)
    dev = device_loss(L2_S, experts_TK, L2_DEVICE)
    comm = comm_loss(L2_S, experts_TK, L2_DEVICE, group_limit=2)
    exact(dev, Fraction(81, 80))  # x 0.05 = 0.050625
    exact(comm, Fraction(51, 80))  # x 0.02 = 0.01275
    total = 0.003 * expert_loss(L2_S, experts_TK) + 0.05 * dev + 0.02 * comm
    exact(total, Fraction(666375, 10_000_000))  # 0.0666375


def test_l2_device_map_from_routing_layout() -> None:
    layout = Layout.contiguous(6, num_nodes=3, gpus_per_node=1)
    experts_TK = literal_topk(L2_S, 2)
    exact(device_loss(L2_S, experts_TK, layout.device_of_expert), Fraction(81, 80))
    exact(comm_loss(L2_S, experts_TK, layout.device_of_expert, 2), Fraction(51, 80))


def test_l2_comm_counts_a_token_once_per_device() -> None:
    # t3 sends both experts to device 2: counted once. If it were counted twice, device 2 would
    # receive 3 and the sum would be 51/80 + 3/8 * 31/80.
    experts_TK = literal_topk(L2_S, 2)
    wrong = Fraction(51, 80) + Fraction(3, 8) * Fraction(31, 80)
    assert float(comm_loss(L2_S, experts_TK, L2_DEVICE, 2)) != pytest.approx(float(wrong))


# ----------------------------------------------------------------------------- L3


def test_l3_sequence_loss_literal_selection() -> None:
    experts_TK = literal_topk(L3_S, 2)
    assert sets(experts_TK) == [{0, 1}, {0, 1}, {0, 2}]
    loss = seq_loss(L3_S, experts_TK)
    exact(loss, Fraction(989, 810))
    exact(1e-4 * loss, Fraction(989, 810) / 10_000)  # 1.2209877e-4


def test_l3_raw_sigmoid_value_is_not_produced() -> None:
    experts_TK = literal_topk(L3_S, 2)
    wrong = 2.3777778  # eq. (19) skipped: P from raw sigmoid means
    assert float(expert_loss(L3_S, experts_TK)) == pytest.approx(wrong, abs=1e-7)
    assert float(seq_loss(L3_S, experts_TK)) != pytest.approx(wrong, abs=1e-3)


def test_l3_biased_count_variant() -> None:
    bias_E = torch.tensor([-0.5, 0.0, 0.0, 0.0], dtype=F64)
    actual_TK = literal_topk(L3_S + bias_E, 2)  # the selection the biased router performs
    assert sets(actual_TK) == [{0, 1}, {1, 3}, {2, 3}]
    exact(seq_loss(L3_S, actual_TK), Fraction(751, 810))
    assert float(seq_loss(L3_S, literal_topk(L3_S, 2))) != pytest.approx(751 / 810)


def test_literal_topk_ties_go_to_lower_index_and_ignore_gradients() -> None:
    scores_TE = torch.tensor([[0.2, 0.5, 0.5, 0.5]], requires_grad=True)
    assert literal_topk(scores_TE, 2).tolist() == [[1, 2]]
    assert literal_topk(scores_TE, 2).dtype == torch.int64


# ----------------------------------------------------------------------------- peer tests


def balanced_experts(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Token t takes experts (t*K + j) mod E: distinct per token, every expert used equally
    often when E divides T*K."""
    t_T = torch.arange(num_tokens).unsqueeze(1)
    return (t_T * top_k + torch.arange(top_k)) % num_experts


def test_uniform_router_gives_exactly_one() -> None:
    # powers of two keep every operation exact, so "exactly 1" is an equality in float32
    T, E, K = 64, 8, 2
    experts_TK = balanced_experts(T, E, K)
    uniform_TE = torch.full((T, E), 1.0 / E)
    sigmoid_TE = torch.full((T, E), 0.5)  # constant sigmoid scores: s' = 1/E
    device_E = torch.arange(E) // 2
    losses = [
        switch_loss(uniform_TE, experts_TK),
        expert_loss(uniform_TE, experts_TK, seq_len=16),
        device_loss(uniform_TE, experts_TK, device_E, seq_len=16),
        seq_loss(sigmoid_TE, experts_TK, seq_len=16),
        global_loss(sigmoid_TE, experts_TK),
        global_loss(sigmoid_TE, experts_TK, counts_E=torch.full((E,), 1000)),
        gshard_loss(uniform_TE, balanced_experts(T, E, 1)),
    ]
    for loss in losses:
        assert loss.dtype == torch.float32
        assert float(loss) == 1.0


def test_uniform_comm_loss_is_exactly_one() -> None:
    # 4 devices of 2 experts, M = 2: token t goes to devices t mod 4 and (t + 1) mod 4, so every
    # device receives M T / D tokens
    T, M = 32, 2
    dev_T = torch.arange(T) % 4
    experts_TK = torch.stack([2 * dev_T, 2 * ((dev_T + 1) % 4) + 1], dim=1)
    loss = comm_loss(torch.full((T, 8), 1 / 8), experts_TK, torch.arange(8) // 2, M, seq_len=8)
    assert float(loss) == 1.0


def test_aux_equals_seq_loss_for_one_sequence_with_softmax_scores() -> None:
    g = torch.Generator().manual_seed(1)
    scores_TE = torch.softmax(torch.randn(24, 8, generator=g, dtype=F64), dim=-1)
    experts_TK = literal_topk(scores_TE, 3)
    aux = expert_loss(scores_TE, experts_TK)
    assert float(aux) == pytest.approx(float(seq_loss(scores_TE, experts_TK, seq_len=24)))
    assert float(aux) == pytest.approx(float(global_loss(scores_TE, experts_TK)))


def test_batch_of_two_sequences_is_mean_of_singles() -> None:
    g = torch.Generator().manual_seed(2)
    scores_TE = torch.sigmoid(torch.randn(20, 8, generator=g, dtype=F64))
    experts_TK = literal_topk(scores_TE, 2)
    device_E = torch.arange(8) // 2
    halves = (slice(0, 10), slice(10, 20))
    for loss_fn in (
        lambda s, e, n: expert_loss(s, e, n),
        lambda s, e, n: seq_loss(s, e, n),
        lambda s, e, n: device_loss(s, e, device_E, n),
        lambda s, e, n: comm_loss(s, e, device_E, 2, n),
    ):
        batch = loss_fn(scores_TE, experts_TK, 10)
        singles = [loss_fn(scores_TE[h], experts_TK[h], None) for h in halves]
        assert float(batch) == pytest.approx(float(sum(singles) / 2), rel=1e-12)


def test_global_loss_with_summed_counts_matches_the_whole_batch() -> None:
    # counts summed over two micro-batches give f of the global batch; P stays local
    g = torch.Generator().manual_seed(3)
    scores_TE = torch.sigmoid(torch.randn(16, 8, generator=g, dtype=F64))
    experts_TK = literal_topk(scores_TE, 2)
    counts_E = torch.bincount(experts_TK.flatten(), minlength=8)
    whole = global_loss(scores_TE, experts_TK)
    micro = [
        global_loss(scores_TE[h], experts_TK[h], counts_E) for h in (slice(0, 8), slice(8, 16))
    ]
    assert float(whole) == pytest.approx(float(sum(micro) / 2), rel=1e-12)
    assert float(global_loss(scores_TE, experts_TK, counts_E)) == pytest.approx(float(whole))


def test_gradient_flows_only_through_mean_scores() -> None:
    # d loss / d s_{i,t} = f_i / T: the counts are constants (and counts_E gets no gradient)
    g = torch.Generator().manual_seed(4)
    scores_TE = torch.softmax(torch.randn(12, 6, generator=g, dtype=F64), -1).requires_grad_()
    experts_TK = literal_topk(scores_TE, 2)
    expert_loss(scores_TE, experts_TK).backward()
    f_E = torch.bincount(experts_TK.flatten(), minlength=6).to(F64) * 6 / (2 * 12)
    torch.testing.assert_close(scores_TE.grad, (f_E / 12).expand(12, 6))
    counts_E = torch.bincount(experts_TK.flatten(), minlength=6).to(F64).requires_grad_()
    global_loss(scores_TE, experts_TK, counts_E).backward()
    assert counts_E.grad is None
    assert not expert_loss(scores_TE.detach(), experts_TK).requires_grad


def test_single_expert_corner_case() -> None:
    scores_TE = torch.rand(5, 1, generator=torch.Generator().manual_seed(0))
    experts_TK = torch.zeros(5, 1, dtype=torch.int64)
    assert float(seq_loss(scores_TE, experts_TK)) == 1.0


def test_low_precision_scores_are_computed_in_float32() -> None:
    scores_TE = torch.full((8, 4), 0.25, dtype=torch.bfloat16)
    loss = expert_loss(scores_TE, balanced_experts(8, 4, 2))
    assert loss.dtype == torch.float32
    assert float(loss) == 1.0


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_value_errors_naming_them() -> None:
    s_TE = torch.full((4, 4), 0.25)
    e_TK = balanced_experts(4, 4, 2)
    dev_E = torch.tensor([0, 0, 1, 1])
    cases = [
        (lambda: expert_loss(s_TE, e_TK, seq_len=3), "seq_len=3"),
        (lambda: expert_loss(s_TE, e_TK, seq_len=0), "seq_len=0"),
        (lambda: expert_loss(s_TE, e_TK + 4), "experts_TK"),
        (lambda: expert_loss(s_TE, e_TK.float()), "experts_TK.dtype"),
        (lambda: expert_loss(s_TE[:3], e_TK), "experts_TK has 4 rows"),
        (lambda: expert_loss(s_TE.long(), e_TK), "scores_TE"),
        (lambda: device_loss(s_TE, e_TK, torch.tensor([0, 0, 2, 2])), "device_of_expert_E"),
        (lambda: device_loss(s_TE, e_TK, torch.tensor([0, 1])), "device_of_expert_E"),
        (lambda: comm_loss(s_TE, e_TK, dev_E, group_limit=3), "group_limit=3"),
        (lambda: comm_loss(s_TE, e_TK, dev_E, group_limit=0), "group_limit=0"),
        (lambda: global_loss(s_TE, e_TK, torch.tensor([1, -1, 0, 0])), "counts_E"),
        (lambda: global_loss(s_TE, e_TK, torch.zeros(3)), "counts_E"),
        (lambda: gshard_loss(s_TE, e_TK, form="mtf"), "form='mtf'"),
        (lambda: literal_topk(s_TE, 5), "k=5"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match="allowed") as info:
            call()
        assert fragment in str(info.value)
