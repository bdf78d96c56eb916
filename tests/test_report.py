"""Aggregation on synthetic run directories (written here to the run-directory contract):
summary.parquet schema, mean/95% CI, paired differences, published numbers and claims in the
Markdown, figures (PNG + SVG), byte-identical rebuilds, refusal of bad rows and bad report
settings, and the pipeline CLI commands."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import ReportSettings, StudyConfig, study_from_dict
from moebench.config.fields import NAME_PATTERN
from moebench.io import write_json, write_text, write_yaml
from moebench.report import paths
from moebench.report.aggregate import aggregate
from moebench.report.published import SETTINGS
from moebench.report.stats import mean_ci95, strategy_order
from moebench.report.summary import (
    COLUMNS,
    SUMMARY_SCHEMA,
    collect,
    find_runs,
    load_domain_loads,
)
from moebench.report.tables import stats_table

STRATEGIES = {
    "aux_loss": {"balance": {"switch_alpha": 0.01}},
    "aux_free": {"router": {"score_fn": "sigmoid"}, "balance": {"bias": {"enabled": True}}},
    "node_limited": {"router": {"limit": "node", "group_limit": 2}},
}
VAL_LOSS = {"aux_loss": (3.0, 3.1, 3.2), "aux_free": (2.9, 2.95, 3.0), "node_limited": (3.3,) * 3}
MAXVIO = {"aux_loss": 0.5, "aux_free": 0.05, "node_limited": 0.1}
REPORT = {
    "baseline": "aux_free",
    "compare_to": {"aux_loss": ["lf_t2_aux", "v3_seq"], "aux_free": ["lf_t2_free", "v3_free"]},
}


def make_study(name: str = "syn", seeds: tuple[int, ...] = (0, 1, 2)) -> StudyConfig:
    return study_from_dict(
        {
            "study": name,
            "seeds": list(seeds),
            "datasets": {"shakespeare": {}},
            "strategies": STRATEGIES,
            "base": {"model": {"n_layers": 3, "n_dense_layers": 1}},
            "tracking": {"uri": None},
            "report": REPORT,
        }
    )


def write_run(
    root: Path,
    study: StudyConfig,
    strategy: str,
    seed: int,
    domains: bool = True,
    val_loss: float | None = None,
) -> Path:
    """A complete synthetic run directory: what `moebench train` and `moebench comm` write
    (`domains`: with per-domain loads; `val_loss`: default VAL_LOSS's)."""
    cfg = study.run_config("shakespeare", strategy, seed)
    run = paths.run_dir(study.study, "shakespeare", strategy, seed, root)
    rng = np.random.default_rng(seed)
    val_loss = VAL_LOSS[strategy][seed % 3] if val_loss is None else val_loss
    maxvio = MAXVIO.get(strategy, 0.2)
    loads = rng.integers(50, 150, size=(2, 16)).tolist()
    # Two domains; aux_free's experts specialise (each domain favours its own half).
    tilt = 3.0 if strategy == "aux_free" else 1.0
    halves = np.repeat([[tilt, 1.0], [1.0, tilt]], 8, axis=1)
    by_domain = {
        d: (rng.integers(20, 40, size=(2, 16)) * halves[i]).tolist()
        for i, d in enumerate(("code", "prose"))
    }
    write_yaml(run / "config.resolved.yaml", cfg.model_dump(mode="json"))
    write_json(
        run / "summary.json",
        {
            "study": study.study,
            "dataset": "shakespeare",
            "strategy": strategy,
            "seed": seed,
            "steps": 20,
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "val_bpb": val_loss / 2,
            "maxvio_global": maxvio + 0.01 * seed,
            "maxvio_global_layers": [0.1, 0.2],
            "maxvio_batch_mean": 2 * maxvio,
            "drop_frac": 0.0,
            "tokens_per_s": 1000.0 + seed,
            "mfu": None,
            "load_global": loads,
            **({"load_by_domain": by_domain} if domains else {}),
            "machine": "cpu-test",
            "device": "cpu",
            "git_sha": "0" * 40,
            "torch_version": "2.13.0",
            "elapsed_s": 1.5,
        },
    )
    records = [
        {
            "kind": "train",
            "step": s,
            "maxvio_batch": maxvio * (1 + 10 / s) * (1 + 0.1 * seed),
            "loss": 3.0,
        }
        for s in range(2, 22, 2)
    ] + [{"kind": "eval", "step": 20, "val_loss": val_loss}]
    write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    nodes = 2.0 if strategy == "node_limited" else 2.6
    write_json(
        run / "comm.json",
        {
            "devices_per_token": nodes + 0.8,
            "nodes_per_token": nodes,
            "nvlink_bytes_per_token": 100.0,
            "ib_bytes_per_token": 300.0 * nodes,
            "a2a_time_modeled_us": 12.5,
        },
    )
    return run


def write_runs(root: Path) -> Path:
    study = make_study()
    for strategy in STRATEGIES:
        for seed in study.seeds:
            write_run(root, study, strategy, seed)
    return root


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Synthetic run directories, to be modified by the test."""
    return write_runs(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, list[Path]]:
    """Synthetic run directories aggregated once (read-only for the tests)."""
    root = write_runs(tmp_path_factory.mktemp("built"))
    df, written = aggregate("syn", find_runs(root), root, make_study().report)
    return root, df, written


def test_summary_has_one_validated_row_per_run(
    built: tuple[Path, pd.DataFrame, list[Path]],
) -> None:
    results, df, written = built
    table = pd.read_parquet(paths.summary_file("syn", results))
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 9
    SUMMARY_SCHEMA.validate(table)
    assert table[["strategy", "seed"]].values.tolist() == sorted(
        table[["strategy", "seed"]].values.tolist()
    )
    assert set(table["nodes_per_token"]) == {2.0, 2.6}
    assert all(p.is_file() for p in written)
    pd.testing.assert_frame_equal(df, table)


def test_mean_ci95_is_student_t() -> None:
    values = np.array([1.0, 2.0, 4.0])
    mean, half = mean_ci95(values)
    sem = np.std(values, ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(7 / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sem)
    assert math.isnan(mean_ci95(np.array([5.0]))[1])
    assert math.isnan(mean_ci95(np.array([]))[0])


def test_stats_table_and_strategy_order(built: tuple[Path, pd.DataFrame, list[Path]]) -> None:
    st = stats_table(built[1])
    assert list(st["strategy"]) == ["aux_loss", "aux_free", "node_limited"]
    row = st.set_index("strategy").loc["aux_loss"]
    assert row["n"] == 3
    assert row["val_loss_mean"] == pytest.approx(3.1)
    assert row["val_loss_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert strategy_order({"zeta", "aux_free", "alpha", "none"}) == [
        "none",
        "aux_free",
        "alpha",
        "zeta",
    ]


def test_markdown_prints_paired_differences_published_numbers_and_claims(
    built: tuple[Path, pd.DataFrame, list[Path]],
) -> None:
    results = built[0]
    md = paths.table_file("syn", "md", results).read_text()
    lines = md.splitlines()
    assert "### Paired differences against `aux_free`" in md
    # aux_loss is worse than aux_free in every seed (val_loss +0.1/+0.15/+0.2, MaxVio +0.45).
    paired_section = md.split("### Paired differences")[1].splitlines()
    row = next(x for x in paired_section if re.match(r"\| aux_loss\s+\|\s+3 \|", x))
    assert row.count("resolved (worse)") >= 3
    # The same nodes/token in every run: a zero difference is not resolved.
    assert "not resolved" in row
    for strategy, keys in REPORT["compare_to"].items():
        for key in keys:
            for value in SETTINGS[key].values.values():
                assert re.search(rf"\| {strategy}\s+\|.*\|\s+{value:g} \|", md), (key, value)
    claim = next(x for x in lines if x.startswith("| aux-loss-free balances far better"))
    assert "**reproduced**" in claim and "0.04 vs 0.72" in claim
    assert "aux_free < aux_loss" in claim
    # Only aux_loss and aux_free are matched: V2's claim was not run.
    not_run = next(x for x in lines if "device-limited routing with M=3" in x)
    assert "**not run**" in not_run and "v2_device_m3 ≈ v2_unrestricted" in not_run
    claims = paths.claims_file("syn", results).read_text()
    assert claim in claims.splitlines() and "## Dataset `shakespeare`" in claims
    paired_csv = pd.read_csv(paths.paired_file("syn", results))
    assert set(paired_csv["strategy"]) == {"aux_loss", "node_limited"}
    assert set(paired_csv["baseline"]) == {"aux_free"}
    assert "### Domain specialisation" in md
    for name in (*paths.FIGURES, *paths.OPTIONAL_FIGURES):
        assert f"../figures/syn-shakespeare-{name}.png" in md
    csv = pd.read_csv(paths.table_file("syn", "csv", results))
    assert list(csv["strategy"]) == ["aux_loss", "aux_free", "node_limited"]
    assert {"val_ppl_mean", "val_ppl_ci95", "nodes_per_token_mean"} <= set(csv.columns)


def test_html_page_renders_every_table_with_published_numbers_and_claims(
    built: tuple[Path, pd.DataFrame, list[Path]],
) -> None:
    html = paths.table_file("syn", "html", built[0]).read_text()
    assert html.startswith("<!DOCTYPE html>") and "<title>Study syn</title>" in html
    assert html.count("<table>") == 6  # quality, communication, paired, published, claims, domains
    assert "<h3>Published numbers beside ours</h3>" in html
    assert "<h3>Published claims, checked on ours</h3>" in html
    assert "<strong>reproduced</strong>" in html and "0.04 vs 0.72" in html
    assert "<img" not in html  # the report shows the figures as its own items


def test_without_compare_to_strategies_are_matched_by_what_they_do(
    built: tuple[Path, pd.DataFrame, list[Path]], tmp_path: Path
) -> None:
    runs = sorted(find_runs(built[0]))
    renamed = []  # the same runs under a user's names
    for run in runs:
        name = {"aux_free": "aux_free_fast", "aux_loss": "my_switch"}.get(run.parent.name)
        target = tmp_path / "runs/syn/shakespeare" / (name or run.parent.name) / run.name
        shutil.copytree(run, target)
        for file in ("summary.json", "config.resolved.yaml"):
            text = (target / file).read_text()
            (target / file).write_text(text.replace(run.parent.name, name or run.parent.name))
        renamed.append(target)
    aggregate("syn", renamed, tmp_path, ReportSettings(baseline="aux_free_fast"))
    md = paths.table_file("syn", "md", tmp_path).read_text()
    published = md.split("### Published numbers beside ours")[1].split("###")[0]
    assert re.search(r"\| aux_free_fast\s+\|.*\|\s+0\.04 \|", published)  # lf_t2_free
    assert "my_switch" not in published  # a softmax Switch loss stands for no published run
    claim = next(x for x in md.splitlines() if "aux-loss-free balances far better" in x)
    assert "**not run**" in claim  # [LF]'s aux side needs a sigmoid global-batch loss


def test_figures_are_pngs_with_svgs_beside(
    built: tuple[Path, pd.DataFrame, list[Path]],
) -> None:
    results, _, written = built
    for name in (*paths.FIGURES, *paths.OPTIONAL_FIGURES):
        png_path = paths.figure_file("syn", "shakespeare", name, results)
        png = png_path.read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        svg = png_path.with_suffix(".svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg
        assert {png_path, png_path.with_suffix(".svg")} <= set(written)


def test_rebuild_gives_identical_bytes(built: tuple[Path, pd.DataFrame, list[Path]]) -> None:
    results, _, written = built
    first = {p: p.read_bytes() for p in written}
    for p in written:
        p.unlink()
    aggregate("syn", find_runs(results), results, make_study().report)
    assert {p: p.read_bytes() for p in written} == first


def test_aggregate_reads_and_writes_only_its_study(results: Path) -> None:
    other = make_study("other", seeds=(0,))
    write_run(results, other, "aux_free", 0, domains=False)
    df, _ = aggregate("other", find_runs(results, ["other"]), results)
    assert sorted(set(df["study"])) == ["other"]
    assert paths.summary_file("other", results).is_file()
    assert not paths.table_file("syn", "md", results).exists()
    md = paths.table_file("other", "md", results).read_text()
    assert re.search(r"\| aux_free\s+\|\s+1 \|", md)  # one seed: no CI
    assert "domain_share" not in md  # no specialisation figure without load_by_domain
    with pytest.raises(ValueError, match="runs of other studies \\['syn'\\]"):
        aggregate("other", find_runs(results), results)


NAMES = st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda n: n not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(st.tuples(NAMES, NAMES, NAMES), st.integers(0, 2**63 - 1),
       st.lists(NAMES, max_size=3))
def test_run_identity_inverts_run_dir(names: tuple[str, str, str], seed: int,
                                      root: list[str]) -> None:
    """Any grid point under any root: the path names it back, and it names the path."""
    run = paths.run_dir(*names, seed, Path("/", *root))
    assert paths.run_identity(run) == paths.RunIdentity(*names, seed)
    assert paths.run_dir(*paths.run_identity(run), Path("/", *root)) == run
    assert paths.run_identity(paths.run_dir(*names, seed)) == (*names, seed)  # relative root


@pytest.mark.parametrize(
    "run",
    ["work/runs/syn/ds/aux_free/seed~x", "work/runs/syn/ds/aux_free/seed~-1",
     "work/runs/syn/ds/aux_free/0", "work/other/syn/ds/aux_free/seed~0", "syn/ds/aux_free/seed~0",
     "runs/syn/ds/seed~0"],
)
def test_run_identity_refuses_other_paths(run: str) -> None:
    with pytest.raises(ValueError, match=f"{re.escape(run)} is not a run directory; allowed: "
                       "<root>/runs/<study>/<dataset>/<strategy>/seed~<n>"):
        paths.run_identity(Path(run))


def test_find_runs_reads_only_the_studies_asked_for(results: Path) -> None:
    other = make_study("other", seeds=(0,))
    write_run(results, other, "aux_free", 0, domains=False)
    (paths.run_dir("other", "shakespeare", "aux_free", 0, results).parent / "seed~x").mkdir()
    assert [paths.run_identity(r).study for r in find_runs(results, ["other"])] == ["other"]
    syn = find_runs(results, ["syn"])
    assert {paths.run_identity(r).study for r in syn} == {"syn"}
    assert find_runs(results, []) == []
    assert find_runs(results) == sorted([*syn, *find_runs(results, ["other"])])


def test_incomplete_run_is_skipped(results: Path) -> None:
    run = paths.run_dir("syn", "shakespeare", "aux_free", 2, results)
    (run / "comm.json").unlink()
    assert len(collect(find_runs(results))) == 8


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("maxvio_global", -0.5, "maxvio_global"),
        ("val_ppl", 99.0, "val_ppl == exp\\(val_loss\\)"),
        ("drop_frac", 1.5, "drop_frac"),
    ],
)
def test_schema_refuses_bad_rows(results: Path, field: str, value: float, message: str) -> None:
    path = paths.run_dir("syn", "shakespeare", "aux_loss", 1, results) / "summary.json"
    summary = json.loads(path.read_text())
    summary[field] = value
    write_json(path, summary)
    with pytest.raises(ValueError, match=message):
        aggregate("syn", find_runs(results), results)
    assert not paths.summary_file("syn", results).exists()


def test_mislabelled_or_incomplete_summary_is_refused(results: Path) -> None:
    path = paths.run_dir("syn", "shakespeare", "aux_loss", 1, results) / "summary.json"
    summary = json.loads(path.read_text())
    write_json(path, summary | {"strategy": "aux_free"})
    with pytest.raises(ValueError, match="strategy='aux_free' disagrees with its directory"):
        aggregate("syn", find_runs(results), results)
    del summary["val_loss"]
    write_json(path, summary)
    with pytest.raises(ValueError, match=r"summary.json: val_loss: Field required"):
        aggregate("syn", find_runs(results), results)


def test_aggregate_and_where_commands(tmp_path: Path) -> None:
    results = write_runs(tmp_path / "results")
    study_file = tmp_path / "syn.yaml"
    study_file.write_text(yaml.safe_dump(make_study().to_dict()))
    runner = CliRunner()
    out = runner.invoke(app, ["aggregate", "--results", str(results), "--study", str(study_file)])
    assert out.exit_code == 0, out.output
    assert str(paths.table_file("syn", "md", results)) in out.output
    where = runner.invoke(app, ["where", "--study", str(study_file), "--results", str(results)])
    assert where.exit_code == 0, where.output
    assert str(paths.table_file("syn", "md", results)) in where.output
    assert "MLflow: disabled" in where.output
    bad = runner.invoke(
        app, ["aggregate", "--results", str(tmp_path / "empty"), "--study", str(study_file)]
    )
    assert bad.exit_code == 2
    assert "unfinished runs of study 'syn'" in bad.output
    empty_partial = runner.invoke(app, [
        "aggregate", "--results", str(tmp_path / "empty"), "--study", str(study_file), "--partial"
    ])
    assert empty_partial.exit_code == 2  # nothing finished: nothing to aggregate
    assert not (tmp_path / "empty" / "tables").exists()


def test_partial_aggregate_names_the_missing_runs(tmp_path: Path) -> None:
    """A study in progress: without --partial the unfinished grid is refused (exit 2, the run
    named); with it the finished runs are aggregated and the report lists the missing ones."""
    results = write_runs(tmp_path / "results")
    missing = paths.run_dir("syn", "shakespeare", "aux_loss", 1, results)
    (missing / "comm.json").unlink()
    study_file = tmp_path / "syn.yaml"
    study_file.write_text(yaml.safe_dump(make_study().to_dict()))
    runner = CliRunner()
    args = ["aggregate", "--results", str(results), "--study", str(study_file)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert "--partial" in refused.output and str(missing) in refused.output
    done = runner.invoke(app, [*args, "--partial"])
    assert done.exit_code == 0, done.output
    md = paths.table_file("syn", "md", results).read_text()
    head = "**In progress: 1 of the grid's runs are not finished:**"
    assert f"{head} `shakespeare/aux_loss` (seeds 1)." in md
    table = pd.read_parquet(paths.summary_file("syn", results))
    assert len(table) == len(make_study().grid()) - 1
    assert not ((table["strategy"] == "aux_loss") & (table["seed"] == 1)).any()


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ({"baseline": "nope"}, "report.baseline: strategy 'nope' is not in the study"),
        ({"compare_to": {"aux_free": ["lf_t9"]}}, "'lf_t9' is not a published setting"),
        (
            {"compare_to": {"aux_free": ["lf_t2_free"], "aux_loss": ["lf_t2_free"]}},
            "'lf_t2_free' is matched by both 'aux_free' and 'aux_loss'",
        ),
        ({"domain_strategies": ["x"]}, "report.domain_strategies: strategy 'x'"),
    ],
)
def test_bad_report_settings_are_refused(report: dict[str, object], message: str) -> None:
    raw = make_study().to_dict() | {"report": report}
    with pytest.raises(ValueError, match=re.escape(message)):
        study_from_dict(raw)


def test_malformed_domain_loads_are_refused_before_writing(results: Path) -> None:
    path = paths.run_dir("syn", "shakespeare", "aux_free", 1, results) / "summary.json"
    summary = json.loads(path.read_text())
    summary["load_by_domain"]["code"] = [[1, 2, 3]]  # other domains: 2 layers x 16 experts
    write_json(path, summary)
    with pytest.raises(ValueError, match=re.escape("seed~1/summary.json: load_by_domain must be")):
        aggregate("syn", find_runs(results), results)
    assert not paths.summary_file("syn", results).exists()


SIGMOID = {"score_fn": "sigmoid", "normalize": True}
SWEEP = {
    # strategy: (override, val_loss added to the seed's own 3.0 / 3.2 / 3.4)
    "free_u1e-3": ({"router": SIGMOID, "balance": {"bias": {"enabled": True}}}, (0, 0, 0)),
    "free_u1e-2": (
        {"router": SIGMOID, "balance": {"bias": {"enabled": True, "rate": 1e-2}}},
        (0.001, 0.002, 0.0015),
    ),
    "global_a1e-3": ({"router": SIGMOID, "balance": {"global_alpha": 1e-3}}, (0.05, 0.06, 0.04)),
    "global_a1e-2": ({"router": SIGMOID, "balance": {"global_alpha": 1e-2}}, (0.1, -0.1, 0.0)),
    "device_m2": ({"router": {"limit": "device", "group_limit": 2}}, (0.3, 0.4, 0.35)),
    "device_m3": ({"router": {"limit": "device", "group_limit": 3}}, (0.2, 0.21, 0.19)),
}
SWEEP_REPORT = {
    "compare_to": {
        "free_u1e-3": ["lf_t2_free", "lf_u1e-3", "qiu_t1_free_b512", "v2_unrestricted"],
        "free_u1e-2": ["lf_u1e-2"],
        "global_a1e-3": ["lf_t2_aux", "qiu_t1_aux_b512"],
        "device_m3": ["v2_device_m3"],
    }
}


def test_sweep_study_claims_and_figures(tmp_path: Path) -> None:
    study = study_from_dict(
        {
            "study": "sweep",
            "seeds": [0, 1, 2],
            "datasets": {"shakespeare": {}},
            "strategies": {name: override for name, (override, _) in SWEEP.items()},
            "base": {"model": {"n_layers": 3, "n_dense_layers": 1}},
            "tracking": {"uri": None},
            "report": SWEEP_REPORT,
        }
    )
    for name, (_, shifts) in SWEEP.items():
        for seed in study.seeds:
            write_run(tmp_path, study, name, seed, val_loss=3.0 + 0.2 * seed + shifts[seed])
    aggregate("sweep", find_runs(tmp_path), tmp_path, study.report)
    claims = paths.claims_file("sweep", tmp_path).read_text().splitlines()

    def verdict(claim: str) -> str:
        return next(x for x in claims if x.startswith(f"| {claim}")).split("|")[-2].strip()

    assert verdict("aux-loss-free beats the aux loss on perplexity") == "**reproduced**"
    assert verdict("a global-batch aux loss beats aux-loss-free") == "**contradicted**"
    assert verdict("bias rate u=1e-2 is as good as u=1e-3") == "**reproduced**"
    assert verdict("device-limited routing with M=3 is as good") == "**contradicted**"
    assert verdict("bias rate u=1e-4 is as good as u=1e-3") == "**not run**"
    # The baseline defaults to the first strategy (none of aux_free/global_aux/aux_loss).
    md = paths.table_file("sweep", "md", tmp_path).read_text()
    assert "### Paired differences against `device_m2`" in md
    assert paths.figure_file("sweep", "shakespeare", "m_sweep", tmp_path).is_file()


def test_empty_domain_loads_of_a_dense_model_are_skipped(results: Path) -> None:
    path = paths.run_dir("syn", "shakespeare", "aux_free", 1, results) / "summary.json"
    summary = json.loads(path.read_text())
    write_json(path, summary | {"load_by_domain": {"code": [], "prose": []}})
    loads = load_domain_loads(find_runs(results))
    assert len(loads) == 8 and ("syn", "shakespeare", "aux_free", 1) not in loads
    names, load_DLE = loads[("syn", "shakespeare", "aux_free", 0)]
    assert names == ["code", "prose"] and load_DLE.shape == (2, 2, 16)
