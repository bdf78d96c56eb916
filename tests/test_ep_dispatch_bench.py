"""benchmarks/ep_dispatch.py on gloo (2 CPU processes): for both real topologies, routings
and dispatchers the bytes the real expert-parallel layer's all-to-alls moved equal the
accounting, and the measured ratios show dedup's and the group limit's savings (timings
are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ep_dispatch_bytes_match_the_accounting(tmp_path: Path) -> None:
    out = tmp_path / "ep.jsonl"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks/ep_dispatch.py"), "--backend", "gloo",
         "--world", "2", "--tokens", "64", "--hidden", "16", "--ffn", "8", "--experts", "16",
         "--top-k", "4", "--warmup", "0", "--iters", "1", "--out", str(out)],
        check=True, env=env, capture_output=True, timeout=300,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = [r for r in rows if "bytes_measured" in r]
    assert {(r["topology"], r["routing"], r["dispatcher"]) for r in cases} == {
        (t, r, d) for t in ("2x1", "1x2") for r in ("none", "limited")
        for d in ("per_expert", "dedup")}
    for row in cases:
        assert row["bytes_measured"] == row["bytes_accounted"]
        link = "ib" if row["topology"] == "2x1" else "nvlink"
        assert row["bytes_measured"]["dispatch"][link] > 0
    ratios = {(r["topology"], r["routing"], r["dispatcher"]): r for r in rows
              if "bytes_measured" not in r}
    assert len(ratios) == 8
    for topo in ("2x1", "1x2"):
        for routing in ("none", "limited"):
            assert ratios[topo, routing, "dedup / per_expert"]["bytes"] < 1
        # limited: each token on one rank, one row per token under dedup, K = 4 per_expert
        assert ratios[topo, "limited", "dedup / per_expert"]["bytes"] == 0.25
        assert ratios[topo, "limited / none", "dedup"]["bytes"] < 1
    assert ratios["2x1", "limited / none", "dedup"]["ib_bytes"] < 1
