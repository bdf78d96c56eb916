"""`moebench aggregate`: one study's run directories -> its summary (Parquet, pandera-validated)
-> its tables (Markdown with paired differences, published numbers and claims; the same as
an HTML page for the report; CSV), the
paired and claims files and figures (PNG + SVG), under the output root (docs/run-directory.md).
Needs only the run directories, so every table regenerates without training; the same run
directories always give the same bytes (sorted rows, no timestamps)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from moebench.config import ReportSettings
from moebench.io import remove_temporaries, write_parquet, write_text
from moebench.progress import progress
from moebench.report import figures
from moebench.report.domains import relative_share, specialisation_bits
from moebench.report.markdown import markdown_html
from moebench.report.paths import (
    FIGURES,
    OPTIONAL_FIGURES,
    OUT,
    claims_file,
    figure_file,
    paired_file,
    summary_file,
    table_file,
)
from moebench.report.published import match_settings
from moebench.report.stats import default_baseline, paired_table, strategy_order
from moebench.report.summary import (
    collect,
    load_curves,
    load_domain_loads,
    load_matrices,
    load_settings,
    read_config,
)
from moebench.report.tables import (
    DatasetReport,
    claim_table,
    claims_file_markdown,
    stats_table,
    study_markdown,
)

FIGURE_TITLES = dict(
    zip(
        (*FIGURES, *OPTIONAL_FIGURES),
        (
            "MaxVio_batch over training steps (mean and 95% CI over seeds)",
            "Relative expert load per MoE layer (validation, lowest seed)",
            "Validation perplexity vs MaxVio_global across balance strengths",
            "Nodes and devices per token",
            "The M sweep: perplexity vs devices and nodes per token",
            "Each domain's share of each expert's load (lowest seed)",
            "Domain specialisation per MoE layer",
        ),
        strict=True,
    )
)
"""Markdown titles of the figures, in paths.FIGURES + OPTIONAL_FIGURES order."""


def setting_line(run: Path) -> str:
    """One sentence on the model, topology and training budget shared by a study's runs."""
    cfg = read_config(run)
    m, t, r, tr = cfg.model, cfg.topology, cfg.router, cfg.train
    tokens = tr.batch_size * tr.grad_accum * tr.seq_len
    return (
        f"Setting: {m.n_layers} layers ({m.n_dense_layers} dense), d_model "
        f"{m.d_model}, {r.num_experts} routed experts (top-{r.top_k}) + "
        f"{m.n_shared_experts} shared, placed on {t.num_nodes} nodes x "
        f"{t.gpus_per_node} devices; {tr.steps} steps of {tokens} tokens."
    )


def _points(st: pd.DataFrame, settings: pd.DataFrame) -> pd.DataFrame:
    """Stats rows of one dataset with each strategy's gate, limit, M and balance knobs."""
    per_strategy = settings.drop_duplicates("strategy").set_index("strategy")
    cols = ["limit", "group_limit", "family", "knobs", "knob_value"]
    return st.join(per_strategy[cols], on="strategy")


def _domain_scores(
    domain_loads: dict[tuple[str, str, str, int], tuple[list[str], np.ndarray]],
    study: str,
    dataset: str,
) -> tuple[pd.DataFrame, dict[str, tuple[int, list[str], np.ndarray]]]:
    """Specialisation bits per (strategy, seed, layer) of one study and dataset's runs, and
    each strategy's lowest-seed relative shares for the figure."""
    rows, shares = [], {}
    for (s, d, strategy, seed), (names, load_DLE) in sorted(domain_loads.items()):
        if (s, d) != (study, dataset):
            continue
        rows += [
            {"strategy": strategy, "seed": seed, "layer": layer, "bits": float(bits)}
            for layer, bits in enumerate(specialisation_bits(load_DLE))
        ]
        shares.setdefault(strategy, (seed, names, relative_share(load_DLE)))
    return pd.DataFrame(rows, columns=["strategy", "seed", "layer", "bits"]), shares


def _draw(
    study: str,
    runs: list[Path],
    df: pd.DataFrame,
    st: pd.DataFrame,
    domain_loads: dict[tuple[str, str, str, int], tuple[list[str], np.ndarray]],
    report: ReportSettings,
    baseline: str,
    root: Path,
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, pd.DataFrame], list[Path]]:
    """Draw the figures of every dataset of `study` (`df`: its summary rows, `st`: its stats
    rows, `domain_loads`: its per-domain loads); return the Markdown links and the
    specialisation scores per dataset, and the files written."""
    curves = load_curves(runs)
    matrices = load_matrices(runs)
    settings = load_settings(runs)
    links: dict[str, list[tuple[str, str]]] = {}
    scores: dict[str, pd.DataFrame] = {}
    written: list[Path] = []
    tables_dir = table_file(study, "md", root).parent
    with progress(f"figures of {study}", "dataset", sorted(set(df["dataset"]))) as bar:
        for dataset in bar:
            d_st = st[st["dataset"] == dataset]
            points = _points(d_st, settings[settings["dataset"] == dataset])
            loads = {
                strategy: min(
                    (key[3], m) for key, m in matrices.items() if key[1:3] == (dataset, strategy)
                )
                for strategy in d_st["strategy"]
            }
            loads = {s: v for s, v in loads.items() if v[1].size}  # a dense model has no load
            path = {name: figure_file(study, dataset, name, root) for name in FIGURE_TITLES}
            figures.maxvio_curves(curves[curves["dataset"] == dataset], path["maxvio_batch"])
            figures.load_heatmaps(loads, path["load_heatmap"])
            figures.ppl_vs_maxvio(points, path["ppl_vs_maxvio"])
            figures.nodes_per_token(d_st, path["nodes_per_token"])
            drawn = list(FIGURES)
            if (points["limit"] != "none").any():
                figures.m_sweep(points, baseline, path["m_sweep"])
                drawn.append("m_sweep")
            d_scores, shares = _domain_scores(domain_loads, study, dataset)
            if shares:
                scores[dataset] = d_scores
                chosen = [s for s in report.domain_strategies if s in shares] or list(shares)
                figures.domain_share({s: shares[s] for s in chosen}, path["domain_share"])
                figures.specialisation(d_scores, path["specialisation"])
                drawn += ["domain_share", "specialisation"]
            links[dataset] = [
                (FIGURE_TITLES[name], Path(os.path.relpath(path[name], tables_dir)).as_posix())
                for name in drawn
            ]
            written += [f for name in drawn for f in figures.figure_paths(path[name])]
    return links, scores, written


def aggregate(
    study: str,
    runs: list[Path],
    root: Path = OUT,
    report: ReportSettings | None = None,
    missing: list[tuple[str, str, int]] | None = None,
) -> tuple[pd.DataFrame, list[Path]]:
    """Write the summary, tables, paired and claims files and figures of `study` from its run
    directories `runs` under `root`, compared as `report` (its `report` section) says, naming
    the grid's `missing` (dataset, strategy, seed) runs; return the summary frame and paths."""
    report = report or ReportSettings()
    df = collect(runs)
    others = sorted(set(df["study"]) - {study})
    if others:
        raise ValueError(f"runs of other studies {others} given to aggregate study {study!r}")
    domain_loads = load_domain_loads(runs)  # checked before anything is written
    st = stats_table(df)
    baseline = report.baseline or default_baseline(strategy_order(set(df["strategy"])))
    pt = paired_table(df, {study: baseline})
    # summary.parquet marks a complete aggregation: removed first, written last, so a kill
    # in between leaves no summary beside tables and figures of two aggregations
    summary_file(study, root).unlink(missing_ok=True)
    links, scores, drawn = _draw(study, runs, df, st, domain_loads, report, baseline, root)
    compare_to = report.compare_to or match_settings(load_settings(runs))
    datasets = {
        dataset: DatasetReport(
            stats=st[st["dataset"] == dataset],
            paired=pt[pt["dataset"] == dataset],
            claims=claim_table(df[df["dataset"] == dataset], compare_to),
            compare_to=compare_to,
            specialisation=scores.get(dataset),
            figures=links[dataset],
        )
        for dataset in sorted(set(df["dataset"]))
    }
    setting = setting_line(runs[0])
    missing = missing or []
    md = study_markdown(study, setting, baseline, datasets, missing)
    # the HTML report shows the figures itself: its table page leaves them out
    no_figures = {d: replace(rep, figures=[]) for d, rep in datasets.items()}
    html = markdown_html(
        f"Study {study}", study_markdown(study, setting, baseline, no_figures, missing)
    )
    outputs = {
        table_file(study, "md", root): md,
        table_file(study, "html", root): html,
        table_file(study, "csv", root): st.to_csv(index=False, float_format="%.6g"),
        paired_file(study, root): pt.to_csv(index=False, float_format="%.6g"),
        claims_file(study, root): claims_file_markdown(
            study, {d: rep.claims for d, rep in datasets.items()}
        ),
    }
    for path, text in outputs.items():
        write_text(path, text)
    write_parquet(summary_file(study, root), pa.Table.from_pandas(df, preserve_index=False))
    written = [summary_file(study, root), *outputs, *drawn]
    for folder in {p.parent for p in written}:  # left by a killed earlier aggregation
        remove_temporaries(folder, [p.name for p in written if p.parent == folder])
    return df, written

