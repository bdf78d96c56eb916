"""`moebench mlflow-import` on a real sqlite MLflow store: the committed test-study reference
runs (trained with MLflow off) appear as live training and `aggregate` would have logged
them, and importing again adds nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import RunConfig
from moebench.io import read_jsonl
from moebench.report import paths
from moebench.train.tracking import flatten

REFERENCE = Path("results/reference/test")
RUNS = [(s, n) for s in ("aux_free", "aux_loss") for n in (0, 1)]


def study_file(folder: Path, uri: str | None) -> Path:
    """configs/test.yaml with its tracking store at `uri`."""
    raw = yaml.safe_load(Path("configs/test.yaml").read_text())
    raw["tracking"]["uri"] = uri
    path = folder / "test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def mlflow_import(study: Path, results: Path = REFERENCE) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["mlflow-import", "--study", str(study),
                                      "--results", str(results)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A fresh sqlite store holding the imported test study; its URI and study file."""
    folder = tmp_path_factory.mktemp("mlflow_import")
    uri = f"sqlite:///{folder / 'mlflow' / 'test.db'}"
    study = study_file(folder, uri)
    code, output = mlflow_import(study)
    assert code == 0, output
    assert output.count("imported ") == len(RUNS)
    return uri, study


def children(client: MlflowClient) -> dict[str, Run]:
    """The study's active child runs by run name."""
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_import_gives_the_live_experiment_parent_and_children(store: tuple[str, Path]) -> None:
    uri, _ = store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.endswith("/mlflow/mlruns/test")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`moebench.role` = 'parent'")
    assert parent.info.run_name == "test" and parent.info.status == "FINISHED"
    tables = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"tables/test.md", "tables/test.csv", "tables/test.html"} <= tables
    runs = children(client)
    assert sorted(runs) == [f"{s}/seed~{n} (shakespeare)" for s, n in RUNS]
    for (strategy, seed) in RUNS:
        run = runs[f"{strategy}/seed~{seed} (shakespeare)"]
        folder = paths.run_dir("test", "shakespeare", strategy, seed, REFERENCE)
        config = RunConfig.model_validate(  # as a live run logs it: today's fields included
            yaml.safe_load((folder / "config.resolved.yaml").read_text())).model_dump(mode="json")
        summary = json.loads((folder / "summary.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {k: run.data.tags[k] for k in ("study", "dataset", "strategy", "seed")} == {
            "study": "test", "dataset": "shakespeare", "strategy": strategy, "seed": str(seed)}
        assert run.data.tags["mlflow.source.name"] == "moebench train"
        assert run.data.tags["mlflow.source.git.commit"] == summary["git_sha"]
        # the params a live run of the study logs: its config with the study's tracking
        config["tracking"] |= {"uri": uri, "parent_run_id": parent.info.run_id}
        params = {k: "None" if v is None else str(v) for k, v in flatten(config).items()}
        assert run.data.params == params
        comm = json.loads((folder / "comm.json").read_text())
        assert run.data.metrics["comm.nodes_per_token"] == comm["nodes_per_token"]
        assert run.data.metrics["comm.ib_bytes_per_token"] == comm["ib_bytes_per_token"]
        assert run.data.metrics["maxvio_batch_mean"] == summary["maxvio_batch_mean"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"config.resolved.yaml", "metrics.jsonl", "summary.json"}


def test_metric_histories_are_the_metrics_file(store: tuple[str, Path]) -> None:
    """Every number of metrics.jsonl is in its key's history at its step; the only other
    entries are the summary's number of that key at the last step."""
    client = MlflowClient(store[0])
    runs = children(client)
    for (strategy, seed) in RUNS:
        run = runs[f"{strategy}/seed~{seed} (shakespeare)"]
        folder = paths.run_dir("test", "shakespeare", strategy, seed, REFERENCE)
        summary = flatten(json.loads((folder / "summary.json").read_text()))
        expected: dict[str, Counter] = {}
        for record in read_jsonl(folder / "metrics.jsonl"):
            for key, value in flatten(record).items():
                if key != "step" and isinstance(value, int | float):
                    expected.setdefault(key, Counter())[record["step"], value] += 1
        assert {"loss", "maxvio_batch", "maxvio_batch_layers.0", "val_ppl"} <= set(expected)
        for key, entries in expected.items():
            history = Counter((m.step, m.value)
                              for m in client.get_metric_history(run.info.run_id, key))
            assert history - entries <= Counter({(summary["steps"], summary.get(key)): 1}), key
            assert entries - history == Counter(), key
        loss = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in loss) == sorted(s for s, _ in expected["loss"])


def test_second_import_adds_nothing_and_an_unfinished_child_is_replaced(
        store: tuple[str, Path]) -> None:
    uri, study = store
    client = MlflowClient(uri)
    before = {name: (r.info.run_id, len(client.get_metric_history(r.info.run_id, "loss")))
              for name, r in children(client).items()}
    code, output = mlflow_import(study)
    assert code == 0 and output.count("skipped ") == len(RUNS), output
    after = {name: (r.info.run_id, len(client.get_metric_history(r.info.run_id, "loss")))
             for name, r in children(client).items()}
    assert after == before
    cut_short = before["aux_loss/seed~1 (shakespeare)"][0]  # as if an import was killed
    client.update_run(cut_short, status="RUNNING")
    code, output = mlflow_import(study)
    assert code == 0 and output.count("replaced ") == 1 and output.count("skipped ") == 3
    runs = children(client)
    assert len(runs) == len(RUNS)
    assert runs["aux_loss/seed~1 (shakespeare)"].info.run_id != cut_short
    assert client.get_run(cut_short).info.lifecycle_stage == "deleted"


def test_bad_input_exits_2_before_any_store_is_made(tmp_path: Path) -> None:
    db = tmp_path / "mlflow" / "test.db"
    code, output = mlflow_import(tmp_path / "missing.yaml")
    assert code == 2
    code, output = mlflow_import(study_file(tmp_path, None))
    assert code == 2 and "tracking.uri is null" in output and "Traceback" not in output
    code, output = mlflow_import(study_file(tmp_path, f"sqlite:///{db}"), tmp_path / "empty")
    assert code == 2 and "no finished run of study 'test'" in output, output
    assert not db.parent.exists()
