"""What a researcher sees, in headless Chromium: MLflow's chart view of the imported test
study compares its strategies' runs in one chart, and the study's tables page renders the
published numbers and verdicts (the Snakemake report around it: test_pipeline_e2e.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser
from typer.testing import CliRunner

from local_servers import mlflow_server
from moebench.cli import app
from test_mlflow_import import REFERENCE, RUNS, study_file

REPORT = REFERENCE / "tables" / "test.html"
SCREENSHOT = os.environ.get("MOEBENCH_SCREENSHOT")  # set to regenerate docs/img's picture


@pytest.mark.mlflow_server
def test_mlflow_chart_view_compares_the_strategies_in_one_chart(
        chromium: Browser, tmp_path: Path) -> None:
    db = tmp_path / "mlflow" / "test.db"
    db.parent.mkdir()
    with mlflow_server(db, tmp_path / "artifacts") as (uri, _):
        study = study_file(tmp_path, uri)
        result = CliRunner().invoke(app, ["mlflow-import", "--study", str(study),
                                          "--results", str(REFERENCE)])
        assert result.exit_code == 0, result.output
        experiment_id = MlflowClient(uri).get_experiment_by_name("test").experiment_id
        page = chromium.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{uri}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        area = page.locator('[data-testid="experiment-view-compare-runs-chart-area"]')
        area.wait_for(timeout=30_000)
        # MLflow's UI-wide switch (browser storage, not the experiment) to the training view,
        # and its assistant panel closed, for an uncluttered picture
        page.get_by_text("Model training", exact=True).click()
        page.goto(f"{uri}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        area.wait_for(timeout=30_000)
        page.get_by_role("button", name="Close").last.click()
        # the parent run's expander: its children (the strategies' runs) are drawn
        page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
        page.get_by_placeholder("Search metric charts").fill("val_ppl")
        chart = area.locator(".js-plotly-plot").first
        chart.locator(".scatterlayer .trace").nth(len(RUNS) - 1).wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # the chart's lines finish drawing
        page.screenshot(path=tmp_path / "chart-view.png")
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT)
        lines = chart.locator(".scatterlayer .trace").count()
        assert lines >= len(RUNS)  # one chart of val_ppl holds a line per child run


def test_tables_page_renders_the_published_numbers_and_verdicts(chromium: Browser) -> None:
    page = chromium.new_page()
    page.goto(REPORT.resolve().as_uri())
    headers = page.locator("th:visible").all_inner_texts()
    assert {"theirs", "published", "published claim", "verdict"} <= set(headers), headers
    cells = page.locator("td:visible").all_inner_texts()
    assert any(c.endswith("not resolved") for c in cells), cells  # the verdict cells
