"""Communication accounting: hand-worked toy, brute-force reference, analytic baseline, group
limits, trace replay and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from moebench.cli import app
from moebench.comm import (
    Topology,
    expected_groups_uniform,
    gpu_time_s,
    read_trace,
    summarize,
    token_stats,
    traffic,
)
from moebench.comm.accounting import _batcher_pairs
from moebench.comm.replay import expert_popularity, strategy_config, synthetic_experts
from moebench.config import RunConfig
from moebench.io import write_parquet
from moebench.routing import Layout
from moebench.train.trace import trace_table

# Toy: 2 nodes x 2 GPUs, 8 experts (2 per GPU): GPU0 {0,1}, GPU1 {2,3} on node 0; GPU2 {4,5},
# GPU3 {6,7} on node 1. T = 4 tokens, so token t starts on GPU t (contiguous blocks).
TOY_EXPERTS = [[0, 1, 4], [0, 2, 6], [1, 3, 7], [4, 5, 6]]
# t0 (GPU0): GPUs {0, 2}, nodes {0, 1}. per_expert: e0, e1 self; e4 -> GPU2 IB.
#    dedup: IB to node 1's relay with in-node index 0 = GPU2, which holds e4: IB 1, NVLink 0.
# t1 (GPU1): GPUs {0, 1, 3}, nodes {0, 1}. per_expert: e0 -> GPU0 NVLink, e2 self, e6 -> GPU3 IB.
#    dedup: NVLink 1 -> 0; IB to relay 1*2+1 = GPU3 which holds e6: IB 1, NVLink 1.
# t2 (GPU2): GPUs {0, 1, 3}, nodes {0, 1}. per_expert: e1 -> GPU0 IB, e3 -> GPU1 IB, e7 -> GPU3
#    NVLink. dedup: IB 2 -> relay GPU0 (index 0), NVLink 0 -> 1, NVLink 2 -> 3: IB 1, NVLink 2.
# t3 (GPU3): GPUs {2, 3}, node {1}. per_expert: e4, e5 -> GPU2 NVLink twice, e6 self.
#    dedup: one NVLink 3 -> 2: IB 0, NVLink 1.
TOY_PER_EXPERT = [[0, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 1], [0, 0, 2, 0]]
TOY_DEDUP = [[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 1, 0]]


def toy_topology() -> Topology:
    return Topology.build(8, 2, 2, hidden=10, dispatch_bytes=1, combine_bytes=2)


def test_toy_hand_worked() -> None:
    topo = toy_topology()
    tr = traffic(np.array(TOY_EXPERTS), topo)
    assert tr.matrices["per_expert"].tolist() == TOY_PER_EXPERT
    assert tr.matrices["dedup"].tolist() == TOY_DEDUP
    rows = {r["dispatcher"]: r for r in summarize(tr.token_stats(topo), topo, tr)}
    for r in rows.values():
        assert r["devices_hist"] == [0, 0, 2, 2]  # 2, 3, 3, 2 GPUs
        assert r["nodes_hist"] == [0, 1, 3, 0]  # 2, 2, 2, 1 nodes
        assert r["devices_per_token"] == 2.5
        assert r["nodes_per_token"] == 1.75
    pe, dd = rows["per_expert"], rows["dedup"]
    # per_expert: IB 1+1+2+0 = 4 copies, NVLink 0+1+1+2 = 4; a copy is 10 elements:
    # dispatch 4 * 10 * 1 B / 4 tokens = 10 B/token, combine 4 * 10 * 2 / 4 = 20, sum 30.
    assert (pe["ib_dispatch_bytes_per_token"], pe["ib_combine_bytes_per_token"]) == (10, 20)
    assert (pe["ib_bytes_per_token"], pe["nvlink_bytes_per_token"]) == (30, 30)
    # dedup: IB 1+1+1+0 = 3 copies -> 7.5 + 15 = 22.5 B/token; NVLink 0+1+2+1 = 4 -> 30.
    assert (dd["ib_bytes_per_token"], dd["nvlink_bytes_per_token"]) == (22.5, 30)
    assert dd["ib_bytes_total"] == 90
    # Time: per_expert GPU2 sends 2 IB copies (20 B) at 50 GB/s = 0.4 ns = 4e-4 us (its
    # NVLink load, 2 copies at 160 GB/s, is faster); combine doubles the bytes: 8e-4 us.
    assert pe["busiest_gpu"] == 2
    assert pe["a2a_dispatch_us"] == pytest.approx(4e-4)
    assert pe["a2a_time_modeled_us"] == pytest.approx(12e-4)
    # dedup: every GPU sends and receives at most 1 IB copy: 10 B / 50 GB/s = 2e-4 us.
    assert dd["a2a_dispatch_us"] == pytest.approx(2e-4)
    assert dd["a2a_combine_us"] == pytest.approx(4e-4)


def test_combine_time_is_dispatch_time_scaled() -> None:
    topo = toy_topology()
    m = np.array(TOY_PER_EXPERT)
    np.testing.assert_allclose(
        gpu_time_s(m, topo, "combine"), 2 * gpu_time_s(m, topo, "dispatch"), rtol=1e-12
    )


def _reference(experts_TK: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Per-token loop straight from the dispatcher definitions (accounting docstring)."""
    T = len(experts_TK)
    D, G = topo.num_devices, topo.gpus_per_node
    dev_of = topo.layout.device_of_expert.tolist()
    per_expert, dedup = np.zeros((D, D), int), np.zeros((D, D), int)
    for t, experts in enumerate(experts_TK):
        s = t * D // T
        devs = [dev_of[e] for e in experts]
        for d in devs:
            if d != s:
                per_expert[s, d] += 1
        for n in {d // G for d in devs} - {s // G}:
            dedup[s, n * G + s % G] += 1
        for d in set(devs):
            sender = d // G * G + s % G
            if sender != d:
                dedup[sender, d] += 1
    return per_expert, dedup


def test_matches_per_token_reference() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        N, G, per_gpu = (int(v) for v in rng.integers(1, 4, size=3))
        E = N * G * per_gpu
        K = int(rng.integers(1, min(E, 9) + 1))
        T = int(rng.integers(1, 50))
        placement = rng.permutation(E).tolist() if trial % 2 else None
        topo = Topology.build(E, N, G, placement=placement, hidden=3)
        experts_TK = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
        per_expert, dedup = _reference(experts_TK, topo)
        chunk = int(rng.integers(1, 20))
        tr = traffic(experts_TK, topo, threads=2, chunk=chunk)
        np.testing.assert_array_equal(tr.matrices["per_expert"], per_expert)
        np.testing.assert_array_equal(tr.matrices["dedup"], dedup)
        fast = token_stats(torch.from_numpy(experts_TK), topo, threads=2, chunk=chunk)
        assert fast.copies == tr.token_stats(topo).copies
        np.testing.assert_array_equal(fast.joint_hist, tr.joint_hist)
        distinct = [
            len({topo.layout.device_of_expert[e].item() for e in row}) for row in experts_TK
        ]
        assert fast.devices_per_token == pytest.approx(np.mean(distinct))


def test_sorting_network_sorts_every_01_input() -> None:
    for n in range(1, 11):
        for bits in itertools.product((0, 1), repeat=n):
            x = list(bits)
            for a, b in _batcher_pairs(n):
                x[a], x[b] = min(x[a], x[b]), max(x[a], x[b])
            assert x == sorted(bits)


def test_analytic_baseline_values() -> None:
    # C(224, 8) / C(256, 8) = 0.3381685; 8 * (1 - 0.3381685) = 5.29 (docs/metrics.md §3, DeepEP)
    assert expected_groups_uniform(256, 8, 8) == pytest.approx(5.294652, abs=1e-6)
    assert expected_groups_uniform(8, 8, 8) == 8.0  # every expert, every group
    assert expected_groups_uniform(8, 1, 3) == 1.0
    with pytest.raises(ValueError, match="num_groups"):
        expected_groups_uniform(256, 7, 8)


def test_uniform_replay_matches_analytic() -> None:
    layout = Layout.contiguous(256, 8, 8)
    experts_TK = synthetic_experts("uniform", 20000, layout, 8, seed=0)
    stats = token_stats(experts_TK, Topology(layout))
    assert stats.nodes_per_token == pytest.approx(expected_groups_uniform(256, 8, 8), rel=0.01)
    assert stats.devices_per_token == pytest.approx(expected_groups_uniform(256, 64, 8), rel=0.01)


@pytest.mark.parametrize(
    ("strategy", "hist"), [("node_limited", "nodes_hist"), ("device_limited", "devices_hist")]
)
def test_group_limited_traces_respect_the_limit(strategy: str, hist: str) -> None:
    layout = Layout.contiguous(256, 8, 8)
    cfg = strategy_config(strategy, layout, 8, 4)
    bias_E = torch.randn(256, generator=torch.Generator().manual_seed(3))  # large, +/-
    experts_TK = synthetic_experts(
        strategy, 4096, layout, 8, 1, expert_popularity(256, 0.25, 0), cfg, bias_E
    )
    counts = getattr(token_stats(experts_TK, Topology(layout)), hist)
    assert counts[5:].sum() == 0 and counts[4] > 0  # at most M = 4, and the limit binds


def test_topology_validation() -> None:
    layout = Layout.contiguous(8, 2, 2)
    with pytest.raises(ValueError, match="hidden=0"):
        Topology(layout, hidden=0)
    with pytest.raises(ValueError, match="ib_gbps=-1"):
        Topology(layout, ib_gbps=-1)
    with pytest.raises(ValueError, match="phase='x'"):
        Topology(layout).bytes_per_copy("x")
    with pytest.raises(ValueError, match="experts_TK holds ids"):
        token_stats(np.array([[0, 8]]), Topology(layout))
    assert Topology.v3().name == "8x8"


def _write_trace(path, experts_LTK: torch.Tensor) -> None:
    cfg = RunConfig.model_validate(
        {
            "router": {"num_experts": 8, "top_k": 3},
            "topology": {"num_nodes": 2, "gpus_per_node": 2},
            "model": {"d_model": 10, "n_heads": 1},
        }
    )
    write_parquet(path, trace_table(experts_LTK, torch.rand(experts_LTK.shape), cfg, seq_len=2))


def test_comm_cli_on_a_trace(tmp_path) -> None:
    experts_LTK = torch.tensor([TOY_EXPERTS, [[7, 6, 5], [3, 2, 1], [0, 4, 6], [1, 2, 3]]])
    _write_trace(tmp_path / "routing_trace.parquet", experts_LTK)
    trace = read_trace(tmp_path / "routing_trace.parquet")
    np.testing.assert_array_equal(trace.experts, experts_LTK.numpy())
    result = CliRunner().invoke(
        app, ["comm", "--trace", str(tmp_path / "routing_trace.parquet"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "comm.parquet").to_pylist()
    assert [(r["layer"], r["dispatcher"]) for r in table] == [
        (0, "per_expert"),
        (0, "dedup"),
        (1, "per_expert"),
        (1, "dedup"),
    ]
    assert table[1]["ib_bytes_per_token"] == 22.5  # layer 0 is the toy (hidden = d_model = 10)
    summary = json.loads((tmp_path / "comm.json").read_text())
    layer1 = token_stats(experts_LTK[1], toy_topology())
    assert summary["nodes_per_token"] == pytest.approx((1.75 + layer1.nodes_per_token) / 2)
    for key in (
        "devices_per_token",
        "nvlink_bytes_per_token",
        "ib_bytes_per_token",
        "a2a_time_modeled_us",
        "ib_bytes_per_token_per_expert",
    ):
        assert key in summary


def test_comm_cli_reads_its_settings_from_the_study(tmp_path) -> None:
    """`--study`: the study's `comm:` section sets what the options leave unset (so the rule
    passes only the study); an option given wins; a bad study exits 2 before any output."""
    _write_trace(tmp_path / "routing_trace.parquet", torch.tensor([TOY_EXPERTS]))
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "seeds": [0], "datasets": {"d": {}}, "strategies": {"a": {}},
        "comm": {"hidden": 20, "dispatch_bytes": 2.0},
    }))
    args = ["comm", "--trace", str(tmp_path / "routing_trace.parquet"), "--study", str(study)]

    def dedup_ib(out: Path, *extra: str) -> float:
        result = CliRunner().invoke(app, [*args, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        return pq.read_table(out / "comm.parquet").to_pylist()[1]["ib_bytes_per_token"]

    # the toy's 22.5 B at hidden 10, 1 + 2 bytes: twice the elements, 2 + 2 bytes
    assert dedup_ib(tmp_path / "a") == pytest.approx(22.5 * 2 * 4 / 3)
    assert dedup_ib(tmp_path / "b", "--dispatch-bytes", "1") == pytest.approx(22.5 * 2)
    bad = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "none.yaml"), "--out",
                                   str(tmp_path / "c")])
    assert bad.exit_code == 2 and not (tmp_path / "c").exists()


def test_read_trace_rejects_incomplete(tmp_path) -> None:
    path = tmp_path / "t.parquet"
    _write_trace(path, torch.tensor([TOY_EXPERTS]))
    table = pq.read_table(path)
    write_parquet(path, table.slice(1))  # one (layer, token, slot) missing
    with pytest.raises(ValueError, match="exactly once"):
        read_trace(path)


def test_comm_replay_cli(tmp_path) -> None:
    out = tmp_path / "replay.parquet"
    result = CliRunner().invoke(
        app,
        [
            "comm-replay",
            "--output",
            str(out),
            "--nodes",
            "4",
            "--gpus-per-node",
            "2",
            "--experts",
            "32",
            "--top-k",
            "4",
            "--group-limit",
            "2",
            "--tokens-per-gpu",
            "64",
            "--bias-steps",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert {r["strategy"] for r in rows} == {
        "uniform",
        "unrestricted",
        "device_limited",
        "node_limited",
    }
    limited = [r for r in rows if r["strategy"] == "node_limited"]
    assert all(sum(r["nodes_hist"][3:]) == 0 for r in limited)
    assert out.with_suffix(".md").read_text().split("|")[1].strip() == "topology"
