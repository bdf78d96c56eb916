"""`moebench aggregate`: one study's run directories -> its summary (Parquet, pandera-validated)
-> its tables (Markdown with published numbers, CSV) and figures. Needs only the run
directories, so every table regenerates without training; the same run directories always
give the same bytes (sorted rows, no timestamps)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import yaml

from moebench.io import remove_temporaries, write_parquet, write_text
from moebench.report import figures
from moebench.report.paths import FIGURES, OUT, figure_file, summary_file, table_file
from moebench.report.summary import collect, load_curves, load_matrices
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


def aggregate(study: str, runs: list[Path], root: Path = OUT) -> tuple[pd.DataFrame, list[Path]]:
    """Write the summary, tables and figures of `study` from its run directories `runs`
    under `root`; return the summary frame and the paths written."""
    df = collect(runs)
    others = sorted(set(df["study"]) - {study})
    if others:
        raise ValueError(f"runs of other studies {others} given to aggregate study {study!r}")
    st = stats_table(df)
    links = _draw(study, runs, df, st, root)
    md = study_markdown(study, st, setting_line(runs[0]), links)
    write_parquet(summary_file(study, root), pa.Table.from_pandas(df, preserve_index=False))
    write_text(table_file(study, "md", root), md)
    write_text(table_file(study, "csv", root), st.to_csv(index=False, float_format="%.6g"))
    written = [summary_file(study, root), table_file(study, "md", root)]
    written += [table_file(study, "csv", root)]
    written += [figure_file(study, d, n, root) for d in sorted(set(df["dataset"])) for n in FIGURES]
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
