"""The expert-parallel layer benchmarks on gloo (2 CPU processes); timings are not checked.

benchmarks/ep_placement.py: under a skewed routing the fitted placement lowers the modelled
busiest rank, and for both layouts the bytes the real layer's all-to-alls moved equal the
accounting. benchmarks/ep_dispatch.py: for both real topologies, routings and dispatchers
the useful bytes moved equal the accounting, the padded per_expert all-to-all moves its
fixed capacity and drops nothing at its default factor, and the measured ratios show dedup's
and the group limit's savings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, tmp_path: Path, *options: str) -> list[dict[str, Any]]:
    """Run benchmarks/`script` on 2 gloo ranks with a tiny layer; its JSON lines."""
    out = tmp_path / "ep.jsonl"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--backend", "gloo", "--world", "2",
         "--hidden", "16", "--ffn", "8", "--experts", "16", "--top-k", "4", "--warmup", "0",
         "--iters", "1", "--output", str(out), *options],
        check=True, env=env, capture_output=True, timeout=300,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_ep_placement_bytes_match_the_accounting(tmp_path: Path) -> None:
    base, fitted, ratio = run_bench("ep_placement.py", tmp_path, "--tokens", "128")
    assert (base["layout"], fitted["layout"]) == ("contiguous", "search")
    for row in (base, fitted):
        assert row["bytes_measured"] == row["bytes_accounted"] > 0
    assert fitted["busiest_over_mean_modelled"] < base["busiest_over_mean_modelled"]
    assert ratio["busiest_over_mean_modelled"] < 1


def test_ep_dispatch_bytes_match_the_accounting(tmp_path: Path) -> None:
    rows = run_bench("ep_dispatch.py", tmp_path, "--tokens", "64")
    cases = [r for r in rows if "bytes_measured" in r]
    assert {(r["topology"], r["routing"], r["dispatcher"]) for r in cases} == {
        (t, r, d) for t in ("2x1", "1x2") for r in ("none", "limited")
        for d in ("per_expert", "dedup", "per_expert_padded")}
    for row in cases:
        assert row["bytes_measured"] == row["bytes_accounted"]
        link = "ib" if row["topology"] == "2x1" else "nvlink"
        assert row["bytes_measured"]["dispatch"][link] > 0
        if row["dispatcher"] == "per_expert_padded":
            # C = ceil(2 * 64 tokens * 4 / 2) = 256 rows of 16 float32 to the other rank
            assert (row["a2a_capacity_factor"], row["a2a_dropped"]) == (2, 0)
            assert row["bytes_moved"] == {p: {link: 2 * 256 * 64, other: 0}
                                          for p in ("dispatch", "combine")
                                          for other in {"ib", "nvlink"} - {link}}
    ratios = {(r["topology"], r["routing"], r["dispatcher"]): r for r in rows
              if "bytes_measured" not in r}
    assert len(ratios) == 14
    for topo in ("2x1", "1x2"):
        for routing in ("none", "limited"):
            assert ratios[topo, routing, "dedup / per_expert"]["bytes"] < 1
            assert ratios[topo, routing, "per_expert_padded / per_expert"]["bytes"] == 1
        # limited: each token on one rank, one row per token under dedup, K = 4 per_expert
        assert ratios[topo, "limited", "dedup / per_expert"]["bytes"] == 0.25
        assert ratios[topo, "limited / none", "dedup"]["bytes"] < 1
    assert ratios["2x1", "limited / none", "dedup"]["ib_bytes"] < 1
