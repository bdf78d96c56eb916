"""Seed statistics: mean and 95% CI over seeds, and paired differences against a baseline
(the same seed is the same initialisation and data order in every strategy, so strategy −
baseline per seed removes the seed's own noise). Every headline metric is lower-is-better.
A difference counts as resolved only when its 95% CI excludes zero; see docs/statistics.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

PAIRED_METRICS = (
    "val_ppl",
    "val_loss",
    "maxvio_global",
    "maxvio_batch_mean",
    "drop_frac",
    "devices_per_token",
    "nodes_per_token",
)
"""Metrics compared with the baseline, seed by seed (all lower-is-better)."""
PAIRED_COLUMNS = (
    "study",
    "dataset",
    "strategy",
    "baseline",
    "metric",
    "n_pairs",
    "strategy_mean",
    "baseline_mean",
    "diff_mean",
    "diff_ci95",
    "verdict",
)
"""Columns of `paired_table` (and of <study>-paired.csv)."""
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
"""Strategy order of the tables and figures; other strategies follow alphabetically."""
BASELINE_PREFERENCE = ("aux_free", "global_aux", "aux_loss")
"""Baseline of a study that names none: the first of these it has, else its first strategy."""


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


@dataclass(frozen=True)
class Paired:
    """Strategy − baseline over the seeds both have: n pairs, the two means over those seeds,
    the mean difference and the half-width of its 95% CI (NaN when n < 2)."""

    n: int
    lhs: float
    rhs: float
    diff: float
    ci95: float

    @property
    def resolved(self) -> int:
        """-1 if the CI lies below zero, +1 if above, 0 if it holds zero or is undefined."""
        if math.isnan(self.ci95):
            return 0
        if self.diff + self.ci95 < 0:
            return -1
        return 1 if self.diff - self.ci95 > 0 else 0

    @property
    def verdict(self) -> str:
        """ "resolved (better)" / "resolved (worse)" (lower is better) only when the CI
        excludes zero; "not resolved" when it holds zero; "n/a" below two pairs."""
        if self.n < 2:
            return f"n/a ({self.n} pair{'s' * (self.n != 1)})"
        return {-1: "resolved (better)", 1: "resolved (worse)", 0: "not resolved"}[self.resolved]


def paired(runs: pd.DataFrame, metric: str, lhs: str, rhs: str) -> Paired:
    """`metric` of strategy `lhs` minus strategy `rhs`, paired by seed (`runs`: summary rows
    of one study and dataset; seeds where either value is missing are left out)."""
    cols = ["seed", metric]
    both = runs.loc[runs["strategy"] == lhs, cols].merge(
        runs.loc[runs["strategy"] == rhs, cols], on="seed", suffixes=("_l", "_r")
    )
    both = both.dropna()
    left, right = both[f"{metric}_l"].to_numpy(), both[f"{metric}_r"].to_numpy()
    diff, ci = mean_ci95(left - right)
    means = (float(v.mean()) if v.size else math.nan for v in (left, right))
    return Paired(len(both), *means, diff, ci)


def strategy_order(names: list[str] | set[str]) -> list[str]:
    """Canonical strategies first (CANONICAL_ORDER), then the others sorted."""
    known = [s for s in CANONICAL_ORDER if s in names]
    return known + sorted(set(names) - set(known))


def default_baseline(strategies: list[str]) -> str:
    """The baseline of a study that names none (BASELINE_PREFERENCE, else the first)."""
    return next((s for s in BASELINE_PREFERENCE if s in strategies), strategies[0])


def paired_table(df: pd.DataFrame, baselines: dict[str, str]) -> pd.DataFrame:
    """One row per (study, dataset, strategy other than the baseline, metric): the paired
    difference against the study's baseline (`baselines`: study -> strategy) and its verdict."""
    rows = []
    for (study, dataset), part in df.groupby(["study", "dataset"], sort=True):
        base = baselines[study]
        if base not in set(part["strategy"]):
            continue
        for strategy in strategy_order(set(part["strategy"])):
            if strategy == base:
                continue
            for metric in PAIRED_METRICS:
                p = paired(part, metric, strategy, base)
                rows.append(
                    {
                        "study": study,
                        "dataset": dataset,
                        "strategy": strategy,
                        "baseline": base,
                        "metric": metric,
                        "n_pairs": p.n,
                        "strategy_mean": p.lhs,
                        "baseline_mean": p.rhs,
                        "diff_mean": p.diff,
                        "diff_ci95": p.ci95,
                        "verdict": p.verdict,
                    }
                )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)
