"""End to end: the tiny study (configs/test.yaml: 2 strategies x 2 seeds, a few steps) run by
`snakemake --cores 2` in a scratch directory. Its summary passes the schema; tables, figures
and the Snakemake report exist; MLflow holds a parent run and one child per training run
(also through a real `mlflow server`); a rerun has nothing to do, and deleting one run
reruns only that run and what depends on it."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser

from local_servers import mlflow_server
from moebench.report import paths
from moebench.report.summary import SUMMARY_SCHEMA
from moebench.report.tracking import study_runs
from test_pipeline_dag import dry_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TEST_STUDY = REPO / "configs/test.yaml"
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    """The test's environment with this interpreter's scripts (moebench, mlflow) on PATH."""
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def snakemake(workdir: Path, *args: str, timeout: int = 480) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=env(), timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory in which the test study ran to completion."""
    workdir = tmp_path_factory.mktemp("e2e")
    res = snakemake(workdir, "--cores", "2", "--configfile", str(TEST_STUDY))
    logs = "\n".join(p.read_text() for p in sorted((workdir / "work/logs").rglob("*.log")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs[-3000:]
    (workdir / "snakemake.stderr").write_text(res.stderr)
    return workdir


def test_warnings_of_the_jobs_are_repeated_at_the_end(built: Path) -> None:
    # the test study's 300 KB of Shakespeare are a few plays: its validation split is coarse
    end = (built / "snakemake.stderr").read_text().split("100%) done")[-1]
    assert "[moebench.data.build] warning: the validation split holds" in end


def test_summary_passes_the_schema(built: Path) -> None:
    df = pd.read_parquet(paths.summary_file("test", built / "work"))
    SUMMARY_SCHEMA.validate(df)
    assert sorted(zip(df["strategy"], df["seed"], strict=True)) == [
        ("aux_free", 0),
        ("aux_free", 1),
        ("aux_loss", 0),
        ("aux_loss", 1),
    ]
    assert set(df["study"]) == {"test"} and (df["steps"] == 12).all()


def test_tables_figures_and_where(built: Path) -> None:
    md = paths.table_file("test", "md", built / "work").read_text()
    assert re.search(r"\| aux_free\s+\|\s+2 \|", md)
    assert "### Paired differences against `aux_free`" in md
    for name in paths.FIGURES:
        assert paths.figure_file("test", "shakespeare", name, built / "work").is_file()
    where = subprocess.run(
        [sys.executable, "-m", "moebench", "where", "--study", str(TEST_STUDY)],
        cwd=built,
        capture_output=True,
        text=True,
        env=env(),
        check=True,
    ).stdout
    assert "work/tables/test.md" in where and "work/test-report.html" in where
    assert "reference: results/reference/test" in where
    assert "mlflow ui --backend-store-uri sqlite:///work/mlflow/test.db" in where


def test_aggregate_rebuild_is_byte_identical(built: Path) -> None:
    outputs = [
        paths.summary_file("test", built / "work"),
        paths.table_file("test", "md", built / "work"),
    ]
    before = [p.read_bytes() for p in outputs]
    subprocess.run(
        [sys.executable, "-m", "moebench", "aggregate", "--study", str(TEST_STUDY)],
        cwd=built,
        capture_output=True,
        text=True,
        env=env(),
        check=True,
    )
    assert [p.read_bytes() for p in outputs] == before


def check_runs(runs: list[dict[str, str]]) -> None:
    """One parent run and the four training runs as its children, all finished."""
    parents = [r for r in runs if not r["parent"]]
    assert len(parents) == 1 and parents[0]["name"] == "test"
    children = sorted(r["name"] for r in runs if r["parent"] == parents[0]["run_id"])
    assert children == [
        f"{s}/seed~{n} (shakespeare)" for s in ("aux_free", "aux_loss") for n in (0, 1)
    ]
    assert {r["status"] for r in runs} == {"FINISHED"}


def test_mlflow_sqlite_store_has_parent_and_children(built: Path) -> None:
    uri = f"sqlite:///{built}/work/mlflow/test.db"
    check_runs(study_runs(uri, "test"))
    parent = (built / "work/mlflow/parents/test.txt").read_text().strip()
    client = MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(parent, "tables")}
    assert {"tables/test.md", "tables/test.csv", "tables/test.html"} <= artifacts
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # What the chart view compares: every child has the same metric keys and its strategy
    # as a param (group by it), none encodes the strategy in a key; the parent has no metrics.
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    shared = set.intersection(*(set(c.data.metrics) for c in children))
    assert {"val_ppl", "maxvio_global", "comm.ib_bytes_per_token", "comm.nodes_per_token"} <= (
        shared
    )
    every = set.union(*(set(c.data.metrics) for c in children))
    assert not any("aux_free" in k or k.startswith("summary.") for k in every)
    assert "bias_spread" in every  # the aux-free runs' bias trajectory
    assert sorted(c.data.params["strategy"] for c in children) == [
        "aux_free", "aux_free", "aux_loss", "aux_loss"
    ]
    assert client.get_run(parent).data.metrics == {}
    comm = json.loads(
        (paths.run_dir("test", "shakespeare", "aux_free", 0, built / "work") / "comm.json")
        .read_text()
    )
    free0 = next(c for c in children if c.info.run_name == "aux_free/seed~0 (shakespeare)")
    assert free0.data.metrics["comm.ib_bytes_per_token"] == comm["ib_bytes_per_token"]


@pytest.fixture(scope="module")
def report(built: Path) -> Path:
    """The study's `snakemake --report` page."""
    res = snakemake(built, "--report", "work/test-report.html", "--configfile", str(TEST_STUDY))
    assert res.returncode == 0, res.stderr[-3000:]
    return built / "work/test-report.html"


def test_report_html(built: Path, report: Path) -> None:
    html = report.read_text()
    assert "MaxVio_batch over training steps" in html and "test-shakespeare-load_heatmap" in html
    # the tables page is embedded (base64) as a report item
    page = paths.table_file("test", "html", built / "work").read_bytes()
    assert base64.b64encode(page).decode() in html
    assert "Every table of study" in html


def test_report_in_chromium_draws_every_figure_and_the_tables(
    report: Path, chromium: Browser
) -> None:
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    page.goto(report.as_uri())
    page.get_by_text("Figures", exact=True).click()
    names = [n for n in page.locator("td").all_inner_texts() if n.endswith(".png")]
    assert len(names) == 4, names
    for name in names:  # each figure's eye button shows it: a decoded PNG, full width
        page.locator("tr", has_text=name).locator('a[iconname="eye"]').click()
        img = page.locator(f'img[src*="filename={Path(name).name}"]')
        img.wait_for(timeout=10_000)
        assert img.evaluate("i => i.complete && i.naturalWidth >= 600"), name
    page.goto(report.as_uri())
    page.get_by_text("Tables", exact=True).click()
    page.locator("tr", has_text="tables/test.html").locator('a[iconname="eye"]').click()
    tables = page.frame_locator("iframe").first
    headers = tables.locator("th").all_inner_texts()
    assert {"theirs", "published claim", "verdict", "MaxVio_global"} <= set(headers), headers


def test_nothing_to_do_then_only_the_deleted_run_reruns(built: Path) -> None:
    assert dry_run(built, TEST_STUDY) == []
    run = paths.run_dir("test", "shakespeare", "aux_free", 1, built / "work")
    backup = run.with_name("moved-away")
    run.rename(backup)
    try:
        jobs = dry_run(built, TEST_STUDY)
    finally:
        backup.rename(run)
    assert sorted((j.rule.name, dict(j.wildcards)) for j in jobs) == [
        ("aggregate", {}),
        ("all", {}),
        ("comm", {"study": "test", "dataset": "shakespeare", "strategy": "aux_free", "seed": "1"}),
        ("train", {"study": "test", "dataset": "shakespeare", "strategy": "aux_free", "seed": "1"}),
    ]
    assert dry_run(built, TEST_STUDY) == []


@pytest.fixture
def mlflow_uri(built: Path, tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 over the study's sqlite store."""
    with mlflow_server(built / "work/mlflow/test.db", tmp_path / "artifacts") as (uri, _):
        yield uri


@pytest.mark.mlflow_server
def test_mlflow_server_finds_the_runs(built: Path, mlflow_uri: str, tmp_path: Path) -> None:
    check_runs(study_runs(mlflow_uri, "test"))
    # A study configured with the server's URI gets its experiment and parent run there.
    study = yaml.safe_load(TEST_STUDY.read_text()) | {
        "study": "served",
        "tracking": {"uri": mlflow_uri},
    }
    study_file = tmp_path / "served.yaml"
    study_file.write_text(yaml.safe_dump(study))
    subprocess.run(
        [sys.executable, "-m", "moebench", "mlflow-init", "--study", str(study_file),
         "--output", str(tmp_path / "p.txt")],
        cwd=built,
        env=env(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    served = study_runs(mlflow_uri, "served")
    assert [r["run_id"] for r in served] == [(tmp_path / "p.txt").read_text().strip()]
