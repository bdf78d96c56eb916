"""Aux-loss-free bias: example L4 of docs/balancing.md §10, the update rules, the controller's
bookkeeping (global-batch counts, one update per optimizer step, nothing in eval, schedule,
re-centring, state round trip, all-reduce over ranks) and convergence on a skewed router."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moebench.balancing import BiasController, all_reduce_sum, initial_bias, update_bias
from moebench.metrics import expert_load, max_vio
from moebench.routing import RouterConfig, route

GAMMA = 1e-3
G32 = torch.tensor(GAMMA, dtype=torch.float32)


def ids_for_load(load_E: list[int]) -> torch.Tensor:
    """A [T, 1] routing whose per-expert load is exactly `load_E`."""
    return torch.repeat_interleave(torch.arange(len(load_E)), torch.tensor(load_E)).unsqueeze(1)


# ----------------------------------------------------------------------------- L4


def test_l4_sign_update_and_maxvio() -> None:
    load_E = torch.tensor([12, 6, 3, 3])
    assert max_vio(load_E) == 1.0
    bias_E = update_bias(torch.zeros(4), load_E, GAMMA)
    assert bias_E.dtype == torch.float32
    assert torch.equal(bias_E, torch.stack([-G32, 0 * G32, G32, G32]))


def test_l4_batch_and_global_maxvio_differ() -> None:
    batches = [torch.tensor([8, 4, 2, 2]), torch.tensor([2, 4, 6, 4])]
    assert [max_vio(b) for b in batches] == [1.0, 0.5]
    assert statistics.mean(max_vio(b) for b in batches) == 0.75
    assert max_vio(batches[0] + batches[1]) == 0.25


# ----------------------------------------------------------------------------- update rules


def test_exact_update_on_a_fixed_count_vector() -> None:
    # torchtitan-style: a fixed count vector, every rule, starting from a non-zero bias
    bias_E = torch.tensor([0.5, -0.25, 0.0, 0.125])
    load_E = torch.tensor([10, 2, 4, 8])  # mean 6
    sign = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    assert torch.equal(update_bias(bias_E, load_E, 0.01), bias_E + 0.01 * sign)
    proportional = torch.tensor([-4 / 6, 4 / 6, 2 / 6, -2 / 6])
    torch.testing.assert_close(
        update_bias(bias_E, load_E, 0.01, "proportional"), bias_E + 0.01 * proportional
    )
    ones_E = torch.full((4,), initial_bias("multiplicative"))
    assert torch.equal(update_bias(ones_E, load_E, 0.01, "multiplicative"), 1 + 0.01 * sign)
    assert not torch.equal(bias_E, update_bias(bias_E, load_E, 0.01))  # input untouched


def test_update_works_per_layer_rows() -> None:
    load_LE = torch.tensor([[4, 0], [1, 1], [0, 0]])
    new_LE = update_bias(torch.zeros(3, 2), load_LE, GAMMA, "proportional")
    torch.testing.assert_close(new_LE, torch.tensor([[-GAMMA, GAMMA], [0, 0], [0, 0]]))


def test_update_bias_errors() -> None:
    zeros_E, load_E = torch.zeros(4), torch.tensor([1, 2, 3, 4])
    for rate in (-1e-3, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"rate=.*allowed: a finite number >= 0"):
            update_bias(zeros_E, load_E, rate)
    with pytest.raises(ValueError, match=r"rule='loss'.*allowed"):
        update_bias(zeros_E, load_E, GAMMA, "loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed: equal shapes"):
        update_bias(zeros_E, load_E[:3], GAMMA)
    with pytest.raises(ValueError, match=r"load_E=.*allowed: finite counts >= 0"):
        update_bias(zeros_E, torch.tensor([1.0, -1.0, 0.0, 0.0]), GAMMA)


# ----------------------------------------------------------------------------- controller


def test_one_update_per_optimizer_step_with_global_batch_counts() -> None:
    # Two micro-batches, each badly skewed, together balanced: per-micro-batch updates would move
    # the bias; one update on the summed counts must not.
    ctl = BiasController(num_layers=2, num_experts=4, rate=GAMMA)
    for load in ([4, 0, 4, 0], [0, 4, 0, 4]):
        ctl.observe(0, ids_for_load(load), training=True)
    for load in ([4, 2, 1, 1], [4, 2, 1, 1]):
        ctl.observe(1, ids_for_load(load), training=True)
    assert ctl.counts_LE.tolist() == [[4, 4, 4, 4], [8, 4, 2, 2]]
    ctl.step(0)
    assert torch.equal(ctl.bias_LE[0], torch.zeros(4))
    assert torch.equal(ctl.bias_LE[1], torch.stack([-G32, 0 * G32, G32, G32]))
    assert int(ctl.counts_LE.sum()) == 0  # counts are cleared for the next step
    with pytest.raises(ValueError, match=r"step=0 is invalid; allowed: > 0"):
        ctl.step(0)
    with pytest.raises(ValueError, match=r"step=-1 is invalid; allowed: an int >= 0"):
        ctl.step(-1)


def test_eval_counts_nothing() -> None:
    ctl = BiasController(1, 4, GAMMA)
    ctl.observe(0, ids_for_load([8, 0, 0, 0]), training=False)
    assert int(ctl.counts_LE.sum()) == 0
    ctl.step(0)
    assert torch.equal(ctl.bias_LE, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="training=1 is invalid"):
        ctl.observe(0, ids_for_load([1, 1, 1, 1]), training=1)  # type: ignore[arg-type]


def test_dropped_assignments_are_not_counted() -> None:
    ctl = BiasController(1, 3, GAMMA)
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 1]])
    keep_TK = torch.tensor([[True, True], [False, True], [False, True]])
    ctl.observe(0, experts_TK, keep_TK, training=True)
    assert ctl.counts_LE.tolist() == [[1, 2, 1]]
    assert ctl.counts_LE[0].tolist() == expert_load(experts_TK, 3, keep_TK).tolist()


def test_schedule_rate_then_zero() -> None:
    # V3: gamma = 1e-3, then 0 for the tail; a frozen step leaves the bias bitwise unchanged
    ctl = BiasController(1, 2, GAMMA, freeze_after_step=2)
    assert [ctl.rate_at(s) for s in range(4)] == [GAMMA, GAMMA, 0.0, 0.0]
    history = []
    for step in range(4):
        ctl.observe(0, ids_for_load([3, 1]), training=True)
        ctl.step(step)
        history.append(ctl.bias_LE.clone())
    assert torch.equal(history[1], torch.stack([-G32 - G32, G32 + G32]).unsqueeze(0))
    assert torch.equal(history[1], history[2])
    assert torch.equal(history[2], history[3])


def test_recenter_keeps_selection_invariant_mean() -> None:
    ctl = BiasController(1, 4, GAMMA, recenter=True)
    ctl.observe(0, ids_for_load([5, 1, 1, 1]), training=True)
    ctl.step(0)
    torch.testing.assert_close(ctl.bias_LE, torch.tensor([[-1.5, 0.5, 0.5, 0.5]]) * GAMMA)
    assert abs(float(ctl.bias_LE.mean())) < 1e-9
    mul = BiasController(1, 4, 0.1, rule="multiplicative", recenter=True)
    mul.observe(0, ids_for_load([5, 1, 1, 1]), training=True)
    mul.step(0)
    torch.testing.assert_close(mul.bias_LE, torch.tensor([[0.9, 1.1, 1.1, 1.1]]) / 1.05)


def test_bias_is_updated_in_place_and_state_round_trips() -> None:
    ctl = BiasController(2, 3, GAMMA, rule="proportional")
    bias_view = ctl.bias_LE
    ctl.observe(1, ids_for_load([3, 0, 0]), training=True)
    ctl.step(5)
    assert bias_view is ctl.bias_LE and float(bias_view.abs().sum()) > 0
    ctl.observe(0, ids_for_load([1, 1, 0]), training=True)
    state = ctl.state_dict()
    other = BiasController(2, 3, GAMMA, rule="proportional")
    other.load_state_dict(state)
    assert torch.equal(other.bias_LE, ctl.bias_LE)
    assert torch.equal(other.counts_LE, ctl.counts_LE)
    assert other.last_step == 5
    with pytest.raises(ValueError, match="step=5"):
        other.step(5)
    with pytest.raises(ValueError, match=r"rule='proportional'.*allowed: 'sign'"):
        BiasController(2, 3, GAMMA).load_state_dict(state)
    with pytest.raises(ValueError, match=r"bias_LE.*allowed: a tensor of shape \(2, 4\)"):
        BiasController(2, 4, GAMMA, rule="proportional").load_state_dict(state)


def test_multiplicative_bias_starts_at_one() -> None:
    assert torch.equal(BiasController(2, 3, GAMMA, "multiplicative").bias_LE, torch.ones(2, 3))


def test_controller_argument_errors() -> None:
    cases = [
        (lambda: BiasController(0, 4, GAMMA), "num_layers=0"),
        (lambda: BiasController(1, 4, -GAMMA), "rate=-0.001"),
        (lambda: BiasController(1, 4, float("nan")), "rate=nan"),
        (lambda: BiasController(1, 4, GAMMA, rule="ema"), "rule='ema'"),  # type: ignore[arg-type]
        (lambda: BiasController(1, 4, GAMMA, freeze_after_step=-1), "freeze_after_step=-1"),
        (
            lambda: BiasController(1, 4, GAMMA).observe(1, ids_for_load([1]), training=True),
            "layer=1",
        ),
        (
            lambda: BiasController(1, 4, GAMMA).observe(
                0, ids_for_load([0] * 4 + [1]), training=True
            ),
            "experts_TK",
        ),
        (
            lambda: BiasController(1, 1, GAMMA).observe(
                0, ids_for_load([2]), torch.ones(1, 1, dtype=torch.bool), training=True
            ),
            "keep_TK",
        ),
        (lambda: BiasController(1, 2, GAMMA).step(0, reduce=lambda c: c[0]), "reduce returned"),
    ]
    for call, fragment in cases:
        with pytest.raises(ValueError, match="allowed") as info:
            call()
        assert fragment in str(info.value)


# ----------------------------------------------------------------------------- distributed


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank observes its own skewed load; the all-reduced update must see the sum."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ctl = BiasController(1, 4, GAMMA)
        ctl.observe(0, ids_for_load([[6, 0, 2, 0], [0, 6, 0, 2]][rank]), training=True)
        ctl.step(0, reduce=all_reduce_sum())
        torch.save(ctl.bias_LE, Path(out_dir) / f"bias{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_counts_are_all_reduced_over_ranks(tmp_path: Path) -> None:
    # fork: the children reuse the imported modules (spawn would re-import torch twice)
    mp.start_processes(
        _rank_main,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    biases = [torch.load(tmp_path / f"bias{rank}.pt") for rank in range(2)]
    expected = torch.stack([-G32, -G32, G32, G32]).unsqueeze(0)  # global load [6, 6, 2, 2]
    assert torch.equal(biases[0], expected)
    assert torch.equal(biases[1], expected)


# ----------------------------------------------------------------------------- convergence

CONVERGENCE_UPDATES = 150
CONVERGENCE_BOUND = 100


@pytest.mark.parametrize(("rule", "rate"), [("sign", 5e-3), ("proportional", 1e-2)])
def test_bias_drives_maxvio_below_0p1_on_skewed_router(rule: str, rate: float) -> None:
    """Sigmoid router (E = 16, K = 4) whose logits carry per-expert offsets -2..+2 (initial
    MaxVio about 2.3); 4096 fresh tokens per step, bias from `route` (biased selection,
    unbiased gates). MaxVio_batch must fall below 0.1 within CONVERGENCE_BOUND updates
    (observed: ~70 for sign, ~55 for proportional) and stay below it on average over the
    last 50 of CONVERGENCE_UPDATES updates."""
    E, K, T = 16, 4, 4096
    cfg = RouterConfig(num_experts=E, top_k=K, score_fn="sigmoid")
    ctl = BiasController(1, E, rate, rule=rule)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    offset_E = torch.linspace(-2.0, 2.0, E)
    history = []
    for step in range(CONVERGENCE_UPDATES):
        routing = route(torch.randn(T, E, generator=g) + offset_E, cfg, ctl.bias_LE[0])
        history.append(max_vio(expert_load(routing.experts, E)))
        ctl.observe(0, routing.experts, training=True)
        ctl.step(step)
    assert history[0] > 2.0
    first_below = next(i for i, v in enumerate(history) if v < 0.1)
    assert first_below <= CONVERGENCE_BOUND
    assert statistics.mean(history[-50:]) < 0.1
    assert float(ctl.bias_LE[0, 0]) > 0 > float(ctl.bias_LE[0, -1])  # cold up, hot down
