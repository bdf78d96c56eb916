"""Per-study tables: mean and 95% CI over seeds of every summary metric, paired differences
against the baseline, the published numbers beside ours and the published claims checked on
our paired seeds; rendered as CSV (numbers) and Markdown. Deterministic: same summary rows,
same bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from moebench.report.markdown import markdown_table
from moebench.report.published import CLAIMS, SETTINGS
from moebench.report.stats import PAIRED_METRICS, mean_ci95, paired, strategy_order


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


def fmt(mean: float, ci: float, digits: int, sign: bool = False) -> str:
    """`mean ± ci` with fixed digits (`sign`: always print + or −); `–` for a missing value,
    no ± for a single seed."""
    if math.isnan(mean):
        return "–"
    text = f"{mean:+,.{digits}f}" if sign else f"{mean:,.{digits}f}"
    text = text.replace("-", "−")
    return text if math.isnan(ci) else f"{text} ± {ci:,.{digits}f}"


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


def paired_markdown(pt: pd.DataFrame) -> str:
    """Paired differences of one dataset (`stats.paired_table` rows): one row per strategy,
    one column per metric, `diff ± CI` and the verdict."""
    metrics = [METRICS[m] for m in PAIRED_METRICS]
    rows = []
    for strategy, part in pt.groupby("strategy", sort=False):
        by_metric = part.set_index("metric")
        cells = []
        for m in metrics:
            r = by_metric.loc[m.column]
            cells.append(f"{fmt(r.diff_mean, r.diff_ci95, m.digits, sign=True)} {r.verdict}")
        rows.append([strategy, str(part["n_pairs"].min()), *cells])
    return markdown_table(["strategy", "pairs", *(m.label for m in metrics)], rows)


def claim_table(runs: pd.DataFrame, compare_to: dict[str, list[str]]) -> pd.DataFrame:
    """Every published claim checked on one dataset's runs (`compare_to`: strategy ->
    published settings it reproduces): the matched strategies, the paired difference
    lhs − rhs with its CI, the published values and the verdict ("not run" when a setting has
    no strategy ("" in its column), or a matched strategy has no runs here)."""
    strategy_of = {key: s for s, keys in compare_to.items() for key in keys}
    present = set(runs["strategy"])
    rows = []
    for c in CLAIMS:
        lhs, rhs = strategy_of.get(c.lhs, ""), strategy_of.get(c.rhs, "")
        row: dict[str, object] = {
            "claim": c.text,
            "source": c.source,
            "metric": c.metric,
            "kind": c.kind,
            "margin": c.margin,
            "lhs_setting": c.lhs,
            "rhs_setting": c.rhs,
            "lhs_strategy": lhs,
            "rhs_strategy": rhs,
            "published_lhs": SETTINGS[c.lhs].values.get(c.metric, math.nan),
            "published_rhs": SETTINGS[c.rhs].values.get(c.metric, math.nan),
        }
        if lhs in present and rhs in present:
            p = paired(runs, c.metric, lhs, rhs)
            row |= {
                "n_pairs": p.n,
                "lhs_mean": p.lhs,
                "rhs_mean": p.rhs,
                "diff_mean": p.diff,
                "diff_ci95": p.ci95,
                "verdict": c.verdict(p),
            }
        else:
            row |= dict.fromkeys(("lhs_mean", "rhs_mean", "diff_mean", "diff_ci95"), math.nan)
            row |= {"n_pairs": 0, "verdict": "not run"}
        rows.append(row)
    return pd.DataFrame(rows)


def claims_markdown(claims: pd.DataFrame) -> str:
    """The claim table: ours beside theirs, the smallest difference our CI can resolve
    (its half-width) and the verdict."""
    rows = []
    for r in claims.itertuples():
        m = METRICS[r.metric]
        d = m.digits + 1
        run = r.verdict != "not run"
        theirs = (
            "not published"
            if math.isnan(r.published_lhs)
            else f"{r.published_lhs:g} vs {r.published_rhs:g}"
        )
        margin = ""
        if r.kind == "equal":
            margin = f" (±{r.margin:.1%}" + (
                f" = ±{r.margin * abs(r.rhs_mean):.{d}f})" if run else ")"
            )
        check = "≈" if r.kind == "equal" else "<"
        rows.append(
            [
                r.claim,
                r.source,
                f"{m.label}: {r.lhs_strategy or r.lhs_setting} {check} "
                f"{r.rhs_strategy or r.rhs_setting}{margin}",
                f"{fmt(r.lhs_mean, math.nan, d)} vs {fmt(r.rhs_mean, math.nan, d)}" if run else "–",
                f"{fmt(r.diff_mean, r.diff_ci95, d, sign=True)} (n={r.n_pairs})" if run else "–",
                theirs,
                "–" if not run or math.isnan(r.diff_ci95) else f"±{r.diff_ci95:.{d}f}",
                f"**{r.verdict}**",
            ]
        )
    return markdown_table(
        [
            "published claim",
            "source",
            "check (ours)",
            "ours",
            "ours: difference",
            "theirs",
            "smallest resolvable",
            "verdict",
        ],
        rows,
        "llllrlrl",
    )


def published_markdown(st: pd.DataFrame, compare_to: dict[str, list[str]]) -> str | None:
    """Each published number beside our mean ± CI for the strategy matched to its setting."""
    rows = []
    for r in st.itertuples():
        for key in compare_to.get(r.strategy, []):
            setting = SETTINGS[key]
            for metric, value in setting.values.items():
                m = METRICS[metric]
                ours = fmt(getattr(r, f"{metric}_mean"), getattr(r, f"{metric}_ci95"), m.digits)
                rows.append(
                    [r.strategy, m.label, ours, f"{value:g}", setting.description, setting.source]
                )
    if not rows:
        return None
    return markdown_table(
        ["strategy", "metric", "ours", "published", "published setting", "source"], rows, "llrrll"
    )


def specialisation_markdown(scores: pd.DataFrame) -> str:
    """Specialisation I(domain; expert) in bits per MoE layer: mean ± CI over seeds per
    strategy (`scores`: strategy, seed, layer, bits)."""
    layers = sorted(set(scores["layer"]))
    rows = []
    for strategy in strategy_order(set(scores["strategy"])):
        part = scores[scores["strategy"] == strategy]
        cells = [
            fmt(*mean_ci95(part.loc[part["layer"] == lay, "bits"].to_numpy()), 3) for lay in layers
        ]
        rows.append([strategy, str(part["seed"].nunique()), *cells])
    return markdown_table(["strategy", "n", *(f"layer {lay}" for lay in layers)], rows)


@dataclass(frozen=True)
class DatasetReport:
    """What the study report prints for one dataset (rows of one study and dataset)."""

    stats: pd.DataFrame
    paired: pd.DataFrame
    claims: pd.DataFrame
    compare_to: dict[str, list[str]]
    specialisation: pd.DataFrame | None
    figures: list[tuple[str, str]]


STATS_NOTE = (
    "Mean ± 95% confidence interval over seeds (Student t with n-1 degrees of freedom; n = seeds)."
)
PAIRED_NOTE = (
    "Strategy − baseline, seed by seed (the same seed is the same initialisation and data "
    "order), mean ± 95% CI over the pairs (Student t); lower is better for every metric. "
    "**resolved (better/worse)** only when the CI excludes zero; **not resolved** when it "
    "holds zero; n/a below 2 pairs."
)
CLAIMS_NOTE = (
    "Each claim is checked on the strategies the study matches to the published settings "
    "(`report.compare_to`, or without it by what each strategy's config does), with the "
    "paired difference lhs − rhs: **reproduced** when the "
    "95% CI lies on the published side of zero (for ≈ claims: inside ± the margin), "
    "**contradicted** when it lies on the other side (for ≈: entirely outside the margin), "
    "**not resolved** otherwise. *Smallest resolvable* is the CI half-width: a true "
    "difference smaller than it cannot be told from zero with these seeds. The published "
    "models are 1B-3.4B parameters trained on 10^11 tokens: compare directions, not values."
)


def claims_file_markdown(study: str, claims: dict[str, pd.DataFrame]) -> str:
    """The published claims of a study checked on each dataset (the file the README shows)."""
    out = [f"# Published claims checked on study `{study}`", "", CLAIMS_NOTE]
    for dataset, table in claims.items():
        out += ["", f"## Dataset `{dataset}`", "", claims_markdown(table)]
    return "\n".join(out) + "\n"


def study_markdown(
    study: str,
    setting: str,
    baseline: str,
    datasets: dict[str, DatasetReport],
    missing: list[tuple[str, str, int]],
) -> str:
    """The Markdown report of one study: the grid's `missing` runs (a study in progress),
    then per dataset the metric tables, the paired differences against `baseline`, the
    published numbers beside ours, the claims checked on ours, specialisation and figures."""
    out = [
        f"# Study `{study}`",
        "",
        f"{STATS_NOTE} Generated by `moebench aggregate` from `runs/{study}/` beside `tables/`.",
        "",
        setting,
    ]
    if missing:
        seeds: dict[tuple[str, str], list[int]] = {}
        for dataset, strategy, seed in missing:
            seeds.setdefault((dataset, strategy), []).append(seed)
        listed = "; ".join(
            f"`{d}/{s}` (seeds {', '.join(map(str, n))})" for (d, s), n in sorted(seeds.items())
        )
        head = f"**In progress: {len(missing)} of the grid's runs are not finished:**"
        out += ["", f"{head} {listed}."]
    for dataset, rep in datasets.items():
        out += [
            "",
            f"## Dataset `{dataset}`",
            "",
            "### Quality and balance",
            "",
            _metric_table(rep.stats, QUALITY),
            "",
            "### Communication (modeled, dedup dispatcher)",
            "",
            _metric_table(rep.stats, SYSTEM),
        ]
        if len(rep.paired):
            out += [
                "",
                f"### Paired differences against `{baseline}`",
                "",
                PAIRED_NOTE,
                "",
                paired_markdown(rep.paired),
            ]
        published = published_markdown(rep.stats, rep.compare_to)
        if published:
            out += ["", "### Published numbers beside ours", "", published]
        if rep.compare_to:
            out += [
                "",
                "### Published claims, checked on ours",
                "",
                CLAIMS_NOTE,
                "",
                claims_markdown(rep.claims),
            ]
        if rep.specialisation is not None:
            out += [
                "",
                "### Domain specialisation",
                "",
                "I(domain; expert) in bits per routed assignment, per MoE layer (0 = experts "
                "ignore the domain); mean ± 95% CI over seeds. See docs/statistics.md.",
                "",
                specialisation_markdown(rep.specialisation),
            ]
        if rep.figures:
            out += ["", "### Figures", ""]
            out += [f"![{title}]({path})" for title, path in rep.figures]
    return "\n".join(out) + "\n"
