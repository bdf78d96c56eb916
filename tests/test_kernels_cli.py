"""`moebench kernels --output FILE` on CPU (Triton interpreter): one row per case, all equal."""

from __future__ import annotations

import pyarrow.parquet as pq
from typer.testing import CliRunner

from moebench.cli import app


def test_kernels_command_writes_the_check_table(tmp_path):
    out = tmp_path / "kernels.parquet"
    result = CliRunner().invoke(app, ["kernels", "--output", str(out), "--tokens", "33"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pylist()
    assert [r["case"] for r in table] == ["v3", "v2", "e64", "wang_mul"]
    assert all(r["ids_equal"] and r["load_equal"] for r in table)
    assert all(r["max_weight_err"] < 1e-5 * 16 for r in table)
    assert {r["device"] for r in table} == {"cpu"}
