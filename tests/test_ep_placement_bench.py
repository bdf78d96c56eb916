"""benchmarks/ep_placement.py on gloo (2 CPU processes): under a skewed routing the fitted
placement lowers the modelled busiest rank, and for both layouts the bytes the real
expert-parallel layer's all-to-alls moved equal the accounting (timings are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ep_placement_bytes_match_the_accounting(tmp_path: Path) -> None:
    out = tmp_path / "ep.jsonl"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks/ep_placement.py"), "--backend", "gloo",
         "--world", "2", "--tokens", "128", "--hidden", "16", "--ffn", "8", "--experts", "16",
         "--top-k", "4", "--warmup", "0", "--iters", "1", "--out", str(out)],
        check=True, env=env, capture_output=True, timeout=300,
    )
    base, fitted, ratio = (json.loads(line) for line in out.read_text().splitlines())
    assert (base["layout"], fitted["layout"]) == ("contiguous", "search")
    for row in (base, fitted):
        assert row["bytes_measured"] == row["bytes_accounted"] > 0
    assert fitted["busiest_over_mean_modelled"] < base["busiest_over_mean_modelled"]
    assert ratio["busiest_over_mean_modelled"] < 1
