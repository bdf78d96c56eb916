"""Per-study tables: mean and 95% confidence interval over seeds of every summary metric,
rendered as CSV (numbers) and Markdown (with the published numbers and the published
directions beside ours). Deterministic: same summary rows, same bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from moebench.report.published import DIRECTIONS, published_for

CANONICAL_ORDER = (
    "none",
    "aux_loss",
    "aux_loss_v2",
    "seq_aux",
    "global_aux",
    "aux_free",
    "device_limited",
    "node_limited",
)
"""Strategy order of DESIGN.md; user-defined strategies follow alphabetically."""


@dataclass(frozen=True)
class Metric:
    column: str
    label: str
    digits: int


QUALITY = (
    Metric("val_loss", "val loss", 3),
    Metric("val_ppl", "val ppl", 2),
    Metric("val_bpb", "val bpb", 3),
    Metric("maxvio_global", "MaxVio_global", 3),
    Metric("maxvio_batch_mean", "MaxVio_batch", 3),
    Metric("drop_frac", "dropped", 3),
)
SYSTEM = (
    Metric("devices_per_token", "devices/token", 2),
    Metric("nodes_per_token", "nodes/token", 2),
    Metric("nvlink_bytes_per_token", "NVLink B/token", 0),
    Metric("ib_bytes_per_token", "IB B/token", 0),
    Metric("a2a_time_modeled_us", "a2a µs (model)", 2),
)
"""Wall-clock numbers (tokens/s, MFU) stay out of the tables, so that the same seeds give
byte-identical tables; they are per run in summary.parquet and timing.jsonl."""
METRICS = {m.column: m for m in (*QUALITY, *SYSTEM)}


def strategy_order(names: list[str] | set[str]) -> list[str]:
    """Canonical strategies first (DESIGN.md order), then the others sorted."""
    known = [s for s in CANONICAL_ORDER if s in names]
    return known + sorted(set(names) - set(known))


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% CI (Student t, n-1 degrees of freedom); NaN if n < 2."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan
    sem = float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, float(stats.t.ppf(0.975, values.size - 1)) * sem


def stats_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, dataset, strategy): n seeds, <metric>_mean and <metric>_ci95."""
    rows = []
    for (study, dataset), part in df.groupby(["study", "dataset"], sort=True):
        for strategy in strategy_order(set(part["strategy"])):
            runs = part[part["strategy"] == strategy]
            row: dict[str, object] = {
                "study": study,
                "dataset": dataset,
                "strategy": strategy,
                "n": len(runs),
            }
            for col in METRICS:
                row[f"{col}_mean"], row[f"{col}_ci95"] = mean_ci95(runs[col].to_numpy())
            rows.append(row)
    return pd.DataFrame(rows)


def fmt(mean: float, ci: float, digits: int) -> str:
    """`mean ± ci` with fixed digits; `–` for a missing value, no ± for a single seed."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:,.{digits}f}"
    return text if math.isnan(ci) else f"{text} ± {ci:,.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; `align` has one letter per column, "l" or "r"
    (default: the first column left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = [":---" if a == "l" else "---:" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _metric_table(st: pd.DataFrame, metrics: tuple[Metric, ...]) -> str:
    header = ["strategy", "n", *(m.label for m in metrics)]
    rows = [
        [
            r.strategy,
            str(r.n),
            *(
                fmt(getattr(r, f"{m.column}_mean"), getattr(r, f"{m.column}_ci95"), m.digits)
                for m in metrics
            ),
        ]
        for r in st.itertuples()
    ]
    return markdown_table(header, rows)


def _published_table(st: pd.DataFrame) -> str | None:
    rows = []
    for r in st.itertuples():
        for p in published_for(r.strategy):
            m = METRICS[p.metric]
            ours = fmt(getattr(r, f"{p.metric}_mean"), getattr(r, f"{p.metric}_ci95"), m.digits)
            rows.append([r.strategy, m.label, ours, f"{p.value:g}", p.setting, p.source])
    if not rows:
        return None
    return markdown_table(
        ["strategy", "metric", "ours", "published", "published setting", "source"], rows, "llrrll"
    )


def _directions_table(st: pd.DataFrame) -> str | None:
    by_strategy = st.set_index("strategy")
    rows = []
    for d in DIRECTIONS:
        if d.lhs not in by_strategy.index or d.rhs not in by_strategy.index:
            continue
        m = METRICS[d.metric]
        lo_mean, lo_ci = (by_strategy.at[d.lhs, f"{d.metric}_{s}"] for s in ("mean", "ci95"))
        hi_mean, hi_ci = (by_strategy.at[d.rhs, f"{d.metric}_{s}"] for s in ("mean", "ci95"))
        if lo_mean < hi_mean:
            apart = lo_mean + lo_ci < hi_mean - hi_ci  # False when a CI is NaN (one seed)
            verdict = "yes (CIs apart)" if apart else "yes (CIs overlap)"
        else:
            verdict = "no"
        rows.append(
            [
                d.claim,
                f"{m.label}: {d.lhs} < {d.rhs}",
                fmt(lo_mean, lo_ci, m.digits),
                fmt(hi_mean, hi_ci, m.digits),
                verdict,
                d.source,
            ]
        )
    if not rows:
        return None
    return markdown_table(
        ["published claim", "check", "lhs", "rhs", "holds", "source"], rows, "llrrll"
    )


def study_markdown(
    study: str, st: pd.DataFrame, setting: str, figures: dict[str, list[tuple[str, str]]]
) -> str:
    """The Markdown report of one study: per dataset, the metric tables, the published numbers
    beside ours, the published directions checked on ours, and the figures.

    `st` is `stats_table` restricted to the study; `figures` maps dataset -> [(title, path)]
    with paths relative to the Markdown file."""
    out = [
        f"# Study `{study}`",
        "",
        "Mean ± 95% confidence interval over seeds (Student t with n-1 degrees of freedom; "
        "n = seeds). Generated by `moebench aggregate` from `runs/"
        f"{study}/` beside `tables/`.",
        "",
        setting,
    ]
    for dataset, part in st.groupby("dataset", sort=True):
        out += [
            "",
            f"## Dataset `{dataset}`",
            "",
            "### Quality and balance",
            "",
            _metric_table(part, QUALITY),
            "",
            "### Communication (modeled, dedup dispatcher)",
            "",
            _metric_table(part, SYSTEM),
        ]
        published = _published_table(part)
        if published:
            out += [
                "",
                "### Published numbers beside ours",
                "",
                "The published models are orders of magnitude larger and trained on orders "
                "of magnitude more tokens: compare directions and gaps, not values.",
                "",
                published,
            ]
        directions = _directions_table(part)
        if directions:
            out += ["", "### Published directions, checked on ours", "", directions]
        if figures.get(dataset):
            out += ["", "### Figures", ""]
            out += [f"![{title}]({path})" for title, path in figures[dataset]]
    return "\n".join(out) + "\n"
