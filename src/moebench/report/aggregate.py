"""`moebench aggregate`: run directories -> summary.parquet (every run of every study under
results/runs, pandera-validated) -> per-study tables (Markdown with published numbers, CSV)
and figures. Needs only `results/`, so every table regenerates without training; the same
run directories always give the same bytes (sorted rows, no timestamps)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import yaml

from moebench.io import remove_temporaries, write_parquet, write_text
from moebench.report import figures
from moebench.report.paths import FIGURES, RESULTS, figure_file, summary_file, table_file
from moebench.report.summary import collect, find_runs, load_curves, load_matrices
from moebench.report.tables import stats_table, study_markdown

FIGURE_TITLES = dict(
    zip(
        FIGURES,
        (
            "MaxVio_batch over training steps",
            "Relative expert load per MoE layer (validation, lowest seed)",
            "Validation perplexity vs MaxVio_global",
            "Nodes and devices per token",
        ),
        strict=True,
    )
)
"""Markdown titles of the figures, in paths.FIGURES order."""


def setting_line(run: Path) -> str:
    """One sentence on the model, topology and training budget shared by a study's runs."""
    cfg = yaml.safe_load((run / "config.resolved.yaml").read_text())
    m, t, r, tr = cfg["model"], cfg["topology"], cfg["router"], cfg["train"]
    tokens = tr["batch_size"] * tr["grad_accum"] * tr["seq_len"]
    return (
        f"Setting: {m['n_layers']} layers ({m['n_dense_layers']} dense), d_model "
        f"{m['d_model']}, {r['num_experts']} routed experts (top-{r['top_k']}) + "
        f"{m['n_shared_experts']} shared, placed on {t['num_nodes']} nodes x "
        f"{t['gpus_per_node']} devices; {tr['steps']} steps of {tokens} tokens."
    )


def _draw(
    study: str, runs: list[Path], df: pd.DataFrame, st: pd.DataFrame, root: Path
) -> dict[str, list[tuple[str, str]]]:
    """Draw the four figures of every dataset of `study` (`df`: its summary rows, `st`: its
    stats rows); return the Markdown links per dataset."""
    curves = load_curves(runs)
    matrices = load_matrices(runs)
    links: dict[str, list[tuple[str, str]]] = {}
    tables_dir = table_file(study, "md", root).parent
    for dataset in sorted(set(df["dataset"])):
        d_df, d_st = df[df["dataset"] == dataset], st[st["dataset"] == dataset]
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
        figures.ppl_vs_maxvio(d_df, path["ppl_vs_maxvio"])
        figures.nodes_per_token(d_st, path["nodes_per_token"])
        links[dataset] = [
            (title, Path(os.path.relpath(path[name], tables_dir)).as_posix())
            for name, title in FIGURE_TITLES.items()
        ]
    return links


def aggregate(
    root: Path = RESULTS, studies: list[str] | None = None
) -> tuple[pd.DataFrame, list[Path]]:
    """Write summary.parquet (all runs) and the tables and figures of `studies` (default: all
    studies found); return the summary frame and the paths written."""
    runs = find_runs(root)
    df = collect(runs)
    write_parquet(summary_file(root), pa.Table.from_pandas(df, preserve_index=False))
    written = [summary_file(root)]
    found = sorted(set(df["study"]))
    selected = found if studies is None else studies
    missing = sorted(set(selected) - set(found))
    if missing:
        raise ValueError(f"no complete runs of the studies {missing} (found: {found})")
    st_all = stats_table(df)
    for study in selected:
        study_runs = [r for r in runs if r.parts[-4] == study]
        s_df = df[df["study"] == study]
        st = st_all[st_all["study"] == study].reset_index(drop=True)
        links = _draw(study, study_runs, s_df, st, root)
        md = study_markdown(study, st, setting_line(study_runs[0]), links)
        write_text(table_file(study, "md", root), md)
        write_text(table_file(study, "csv", root), st.to_csv(index=False, float_format="%.6g"))
        written += [table_file(study, "md", root), table_file(study, "csv", root)]
        written += [
            figure_file(study, d, n, root)
            for d in sorted(set(s_df["dataset"]))
            for n in FIGURE_TITLES
        ]
    for folder in {p.parent for p in written}:  # left by a killed earlier aggregation
        remove_temporaries(folder, [p.name for p in written if p.parent == folder])
    return df, written


HEADLINE = ("val_loss", "val_ppl", "maxvio_global", "maxvio_batch_mean", "nodes_per_token")


def study_means(df_study: pd.DataFrame) -> dict[str, float]:
    """Mean over seeds of the HEADLINE metrics, keyed `<metric>/<dataset>/<strategy>` (logged
    to the study's MLflow parent run)."""
    out = {}
    for (dataset, strategy), part in df_study.groupby(["dataset", "strategy"], sort=True):
        for col in HEADLINE:
            out[f"{col}/{dataset}/{strategy}"] = float(part[col].mean())
    return out
