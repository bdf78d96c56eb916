"""The dense baseline (n_dense_layers = n_layers, no MoE layer) through the whole pipeline of a
tiny study: it trains, its MaxVio and drop fractions are null, its routing trace is empty, the
comm stage writes an empty comm.parquet and a null comm.json, and aggregation tabulates it
beside a MoE strategy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import DataConfig, RunConfig, deep_merge
from moebench.data import prepare as prepare_data
from moebench.report import paths
from moebench.report.aggregate import aggregate
from moebench.report.summary import find_runs
from moebench.train import train

DATA = DataConfig(source="synthetic", vocab_size=300, synthetic_docs=40, synthetic_doc_tokens=64)
STRATEGIES = {"none": {}, "dense": {"model": {"n_dense_layers": 2}}}


def run_cfg(data_dir: Path, strategy: str, seed: int) -> RunConfig:
    base = {
        "study": "tiny", "dataset": "syn", "strategy": strategy, "seed": seed,
        "data_dir": str(data_dir), "data": DATA.model_dump(),
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "dense_hidden": 32,
                  "expert_hidden": 8},
        "router": {"num_experts": 8, "top_k": 2},
        "topology": {"num_nodes": 1, "gpus_per_node": 2},
        "train": {"steps": 4, "batch_size": 2, "seq_len": 16, "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 1, "log_every": 1, "trace_tokens": 16},
    }
    return RunConfig.model_validate(deep_merge(base, STRATEGIES[strategy]))


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """results/ of a tiny study: none and dense, 2 seeds, trained and accounted."""
    tmp = tmp_path_factory.mktemp("dense")
    prepare_data(DATA, tmp / "data", seed=0)
    for strategy in STRATEGIES:
        for seed in (0, 1):
            out = tmp / "results" / "runs" / "tiny" / "syn" / strategy / f"seed~{seed}"
            train(run_cfg(tmp / "data", strategy, seed), out, tmp / "ckpt" / strategy / str(seed))
            res = CliRunner().invoke(
                app, ["comm", "--trace", str(out / "routing_trace.parquet"), "--out", str(out)])
            assert res.exit_code == 0, res.output
    return tmp / "results"


def test_dense_run_has_null_balance_metrics_and_an_empty_trace(study_root: Path) -> None:
    run = study_root / "runs" / "tiny" / "syn" / "dense" / "seed~0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] > 0 and summary["params_active"] == summary["params_total"]
    for key in ("maxvio_global", "maxvio_batch_mean", "drop_frac"):
        assert summary[key] is None, key
    assert summary["load_global"] == [] and summary["maxvio_global_layers"] == []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        vio = rec["maxvio_batch"] if rec["kind"] == "train" else rec["maxvio_global"]
        assert vio is None
        assert rec["kind"] == "eval" or (rec["load"] == [] and rec["aux"] == {})
    trace = pq.read_table(run / "routing_trace.parquet")
    assert trace.num_rows == 0
    assert json.loads(trace.schema.metadata[b"moebench"])["num_layers"] == 0
    assert pq.read_table(run / "comm.parquet").num_rows == 0
    comm = json.loads((run / "comm.json").read_text())
    assert comm["num_layers"] == 0
    assert comm["nodes_per_token"] is None and comm["ib_bytes_per_token"] is None


def test_aggregation_tabulates_the_dense_run_beside_moe(study_root: Path) -> None:
    df, _ = aggregate("tiny", find_runs(study_root), study_root)
    dense = df[df["strategy"] == "dense"]
    assert len(dense) == 2 and dense["maxvio_global"].isna().all()
    assert dense["nodes_per_token"].isna().all() and dense["val_loss"].notna().all()
    assert df[df["strategy"] == "none"]["maxvio_global"].notna().all()
    table = paths.table_file("tiny", "md", study_root).read_text()
    assert re.search(r"\| dense\s+\|\s+2 \|", table)
    # Paired against `none`: no MaxVio pairs for a dense model, so no verdict.
    paired = table.split("### Paired differences")[1]
    assert "n/a (0 pairs)" in next(x for x in paired.splitlines() if x.startswith("| dense"))
