"""Expert placement: EPLB's README example, a hand-worked round robin, hypothesis properties
(replicas, loads, capacity, search never worse than contiguous), replay and the CLIs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moebench.cli import app
from moebench.comm.placement import (
    Placement,
    contiguous,
    eplb,
    fit,
    fit_and_judge,
    judge,
)
from moebench.config import RunConfig
from moebench.io import write_parquet
from moebench.train.trace import trace_table

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# github.com/deepseek-ai/EPLB, README "Interface and Example": 2 layers x 12 experts, 16
# physical experts (R = 4), 4 groups, 2 nodes, 8 GPUs; the printed phy2log.
EPLB_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
EPLB_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_eplb_readme_example() -> None:
    for weight, expected in zip(EPLB_WEIGHT, EPLB_PHY2LOG, strict=True):
        p = eplb(np.array(weight), 4, num_groups=4, num_nodes=2, gpus_per_node=4)
        np.testing.assert_array_equal(p.expert_of_slot, expected)
        assert p.slots_per_gpu == 2


def test_round_robin_hand_worked() -> None:
    # 2 experts on 1 node x 2 GPUs, S = 2: expert 0 has replicas in slots 0 (rank 0) and
    # 2 (rank 1), expert 1 in slot 1; slot 3 empty. Pairs of expert 0 in order: (t0, k0),
    # (t1, k1), (t2, k0) -> ranks 0, 1, 0 -> slots 0, 2, 0.
    p = Placement(np.array([0, 1, 0, -1]), np.array([0, 0, 1, 0]), 2, 1, 2)
    slots_TK = p.assign(np.array([[0, 1], [1, 0], [0, 1]]))
    np.testing.assert_array_equal(slots_TK, [[0, 1], [1, 2], [0, 1]])
    np.testing.assert_array_equal(p.slot_loads(np.array([3, 3])), [2, 3, 1, 0])
    np.testing.assert_array_equal(p.gpu_loads(np.array([3, 3])), [5, 1])


def test_contiguous_is_the_runs_layout() -> None:
    p = contiguous(8, 2, 2, redundant=2)  # S = ceil(10 / 4) = 3, one spare slot per GPU
    np.testing.assert_array_equal(p.expert_of_slot, [0, 1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1])


def test_layout_of_a_placement_without_replicas() -> None:
    p = eplb(np.array(EPLB_WEIGHT[0]), 0, num_groups=4, num_nodes=2, gpus_per_node=3)
    device_E = p.layout().device_of_expert.numpy()
    gpu_P = np.arange(len(p.expert_of_slot)) // p.slots_per_gpu
    np.testing.assert_array_equal(device_E[p.expert_of_slot], gpu_P)
    with pytest.raises(ValueError, match="allowed: R = 0"):
        eplb(np.array(EPLB_WEIGHT[0]), 6, 4, 2, 3).layout()


def test_placement_rejects_a_missing_expert() -> None:
    with pytest.raises(ValueError, match=r"experts \[1\] have no replica"):
        Placement(np.array([0, 0]), np.array([0, 1]), 2, 1, 1)


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, int, int]:
    """A skewed routing [T, K] of E experts on N x G GPUs, R redundant, expert groups."""
    N, G = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    E = N * G * draw(st.sampled_from([1, 2, 4]))
    K = draw(st.integers(1, min(E, 4)))
    R = draw(st.sampled_from([0, N, N * G, 2 * N * G]))
    groups = draw(st.sampled_from([g for g in (1, N, N * G) if E % g == 0]))
    T = draw(st.integers(1, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    popularity_E = rng.exponential(draw(st.floats(0.0, 3.0)), E)
    experts_TK = np.argsort(-(rng.gumbel(size=(T, E)) + popularity_E), axis=1)[:, :K]
    return experts_TK, E, N, G, R, groups


@SETTINGS
@given(cases(), st.sampled_from(["contiguous", "eplb", "search"]))
def test_placement_properties(case, rule: str) -> None:
    experts_TK, E, N, G, R, groups = case
    p = fit(rule, experts_TK, E, N, G, R, groups, hidden=16)
    load_E = np.bincount(experts_TK.ravel(), minlength=E)
    replicas_E = p.replicas
    assert (replicas_E >= 1).all()  # every expert has a replica
    # contiguous holds no replicas, EPLB all R; search either (it may keep contiguous's start)
    assert replicas_E.sum() in {"contiguous": {E}, "eplb": {E + R}, "search": {E, E + R}}[rule]
    # capacity: D GPUs x S = ceil((E + R) / D) slots, each holding at most one replica
    assert len(p.expert_of_slot) == N * G * -(-(E + R) // (N * G))
    # replica loads sum to the expert's load, and are what the rule realises on the tokens
    slot_P = p.slot_loads(load_E)
    used = p.expert_of_slot >= 0
    np.testing.assert_array_equal(np.bincount(p.expert_of_slot[used], slot_P[used], E), load_E)
    np.testing.assert_array_equal(
        np.bincount(p.assign(experts_TK).ravel(), minlength=len(slot_P)), slot_P
    )


@SETTINGS
@given(cases())
def test_search_never_worse_than_contiguous_or_eplb(case) -> None:
    experts_TK, E, N, G, R, groups = case
    load_E = np.bincount(experts_TK.ravel(), minlength=E)
    busiest = {
        rule: fit(rule, experts_TK, E, N, G, R, groups, hidden=16).gpu_loads(load_E).max()
        for rule in ("contiguous", "eplb", "search")
    }
    assert busiest["search"] <= min(busiest["contiguous"], busiest["eplb"])


def test_node_groups_keep_the_node_limit() -> None:
    # Routing limited to 1 node of 2: every rule with node groups keeps 1 node per token.
    rng = np.random.default_rng(0)
    node_T = rng.integers(0, 2, 400)
    experts_TK = np.stack([rng.permutation(4)[:2] + 4 * n for n in node_T])
    for rule in ("contiguous", "eplb", "search"):
        p = fit(rule, experts_TK[:200], 8, 2, 2, 4, 2, hidden=16)
        assert judge(p, experts_TK[200:], hidden=16)["nodes_per_token"] == 1.0


def test_judge_on_a_balanced_routing() -> None:
    # Every token uses all 4 experts of 2 x 1 GPUs: each GPU serves 2 pairs per token.
    experts_TK = np.tile(np.arange(4), (10, 1))
    row = judge(contiguous(4, 2, 1), experts_TK, hidden=8)
    assert row["busiest_over_mean"] == 1.0
    assert row["nodes_per_token"] == 2.0
    # dedup: one IB copy per token (to the other node), 8 B dispatch + 16 B combine
    assert row["ib_bytes_per_token"] == 24.0
    rows = fit_and_judge(experts_TK[None], 4, 2, 1, (0, 2), hidden=8)
    assert {(r["rule"], r["redundant"]) for r in rows} == {
        (rule, r) for rule in ("contiguous", "eplb", "search") for r in (0, 2)
    }


def _write_run(root, strategy: str, seed: int, limit: str) -> None:
    cfg = RunConfig.model_validate(
        {
            "router": {"num_experts": 8, "top_k": 2, "limit": limit, "group_limit": 1},
            "topology": {"num_nodes": 2, "gpus_per_node": 2},
            "model": {"d_model": 16, "n_heads": 2},
        }
    )
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 64, 8, generator=gen) + torch.linspace(0, 2, 8)
    if limit == "node":  # tokens pick inside one node
        logits[:, :32, 4:] -= 100
        logits[:, 32:, :4] -= 100
    experts_LTK = logits.topk(2).indices
    run = root / "ds" / strategy / f"seed~{seed}"
    run.mkdir(parents=True)
    table = trace_table(experts_LTK, torch.rand(experts_LTK.shape), cfg, seq_len=8)
    write_parquet(run / "routing_trace.parquet", table)


def test_placement_cli(tmp_path) -> None:
    for seed in (0, 1):
        _write_run(tmp_path / "runs", "skewed", seed, "none")
        _write_run(tmp_path / "runs", "node_limited", seed, "node")
    out = tmp_path / "out" / "study.parquet"
    out.parent.mkdir()
    result = CliRunner().invoke(
        app, ["placement", "--runs", str(tmp_path / "runs"), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pandas()
    assert len(table) == 2 * 3 * 2  # strategies x rules x R in {0, 4}
    assert (table["n"] == 2).all()
    limited = table[table["strategy"] == "node_limited"]
    assert (limited["nodes_per_token_mean"] == 1.0).all()
    base = table[table["rule"] == "contiguous"]
    assert (base["gain_mean"] == 0.0).all()
    for suffix in (".md", ".layers.parquet", ".png", ".svg"):
        assert out.with_suffix(suffix).stat().st_size > 0
    assert len(pq.read_table(out.with_suffix(".layers.parquet"))) == 2 * 2 * 2 * 3 * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--redundant", "0,-1"], "--redundant='0,-1' is invalid"),
        (["--runs", "nowhere"], "runs=nowhere holds no"),
        (["--redundant", "3"], "redundant=3 is invalid; allowed: R >= 0 with E + R = 8 + R"),
    ],
)
def test_placement_cli_rejects_bad_input(tmp_path, args: list[str], message: str) -> None:
    _write_run(tmp_path / "runs", "skewed", 0, "none")  # any R fits (one group)
    _write_run(tmp_path / "runs", "node_limited", 0, "node")  # needs 2 | 8 + R
    base = {"--runs": str(tmp_path / "runs"), "--output": str(tmp_path / "p.parquet")}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = CliRunner().invoke(app, ["placement", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "p.parquet").exists()


def test_placement_replay_cli(tmp_path) -> None:
    out = tmp_path / "v3.parquet"
    args = [
        "--nodes",
        "2",
        "--gpus-per-node",
        "2",
        "--experts",
        "16",
        "--top-k",
        "4",
        "--group-limit",
        "1",
        "--redundant",
        "0,2",
        "--seeds",
        "0,1",
        "--tokens-per-gpu",
        "64",
        "--bias-steps",
        "3",
    ]
    result = CliRunner().invoke(app, ["placement-replay", "--output", str(out), *args])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pandas()
    assert set(table["strategy"]) == {
        "uniform",
        "unrestricted",
        "node_limited",
        "node_limited_aux_free",
    }
    limited = table[table["strategy"].str.startswith("node_limited")]
    assert (limited["nodes_per_token_mean"] == 1.0).all()
