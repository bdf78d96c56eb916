"""Placement studies: every rule of `moebench.comm.placement` fitted and judged on each run's
routing trace of a study (or on synthetic routing at V3 scale), summarised per strategy,
rule and R over seeds (mean and 95% CI, paired difference to contiguous), with a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moebench.comm.placement import RULES, check_redundant, fit_and_judge, groups_of
from moebench.comm.replay import (
    expert_popularity,
    read_trace,
    strategy_config,
    synthetic_experts,
    train_bias,
)
from moebench.comm.topology import Topology
from moebench.io import atomic_path
from moebench.report.markdown import markdown_table
from moebench.report.paths import SEED_PREFIX, seed_of
from moebench.report.tables import fmt, mean_ci95, strategy_order

METRICS = (
    "busiest_over_mean",
    "fit_busiest_over_mean",
    "nodes_per_token",
    "ib_bytes_per_token",
    "nvlink_bytes_per_token",
    "a2a_time_modeled_us",
)
KEYS = ["dataset", "strategy", "rule", "redundant"]
# Synthetic strategies: (strategy of `moebench.comm.replay`, whether the aux-free bias is
# trained). "uniform" routing is balanced in expectation: its held-out busiest/mean is the
# sampling-noise floor of the judged tokens.
SYNTHETIC = {
    "uniform": ("uniform", False),
    "unrestricted": ("unrestricted", False),
    "node_limited": ("node_limited", False),
    "node_limited_aux_free": ("node_limited", True),
}


def _order(names: set[str]) -> list[str]:
    """Synthetic strategies in `SYNTHETIC` order; a study's in the canonical order."""
    if names <= set(SYNTHETIC):
        return [s for s in SYNTHETIC if s in names]
    return strategy_order(names)


def run_traces(runs: Path) -> list[tuple[str, str, int, Path]]:
    """(dataset, strategy, seed, trace) of every <runs>/<dataset>/<strategy>/seed~<n>/
    routing_trace.parquet; ValueError if there is none."""
    found = []
    for path in sorted(Path(runs).glob(f"*/*/{SEED_PREFIX}*/routing_trace.parquet")):
        seed = seed_of(path.parent.name)
        if seed is not None:
            found.append((path.parents[2].name, path.parents[1].name, seed, path))
    if not found:
        raise ValueError(
            f"runs={runs} holds no <dataset>/<strategy>/seed~<n>/routing_trace.parquet; "
            "allowed: a study's run folder, e.g. work/runs/default"
        )
    return found


def trace_rows(
    runs: Path, redundant: tuple[int, ...] | None, **topo_kwargs: float
) -> list[dict[str, Any]]:
    """`fit_and_judge` rows of every run's trace (topology and expert groups from the trace;
    R defaults to 0 and one redundant expert per GPU). Every trace and R is checked first."""
    jobs = []
    for dataset, strategy, seed, path in run_traces(runs):
        trace = read_trace(path)
        m = trace.meta
        N, G, E = int(m["num_nodes"]), int(m["gpus_per_node"]), int(m["num_experts"])
        groups = groups_of(m["limit"], N, G)
        rs = redundant or (0, N * G)
        for r in rs:
            try:
                check_redundant(r, E, N, groups)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        jobs.append(((dataset, strategy, seed), trace, (E, N, G, rs, groups), int(m["d_model"])))
    rows = []
    for (dataset, strategy, seed), trace, args, d_model in jobs:
        for row in fit_and_judge(trace.experts, *args, **{"hidden": d_model, **topo_kwargs}):
            rows.append({"dataset": dataset, "strategy": strategy, "seed": seed, **row})
    return rows


def synthetic_rows(
    topo: Topology,
    redundant: tuple[int, ...],
    seeds: tuple[int, ...],
    tokens_per_gpu: int = 1024,
    top_k: int = 8,
    group_limit: int = 4,
    skew: float = 0.25,
    bias_steps: int = 300,
    bias_rate: float = 1e-3,
) -> list[dict[str, Any]]:
    """`fit_and_judge` rows of one layer of skewed synthetic routing per `SYNTHETIC` strategy
    and seed (as `moebench.comm.replay`: popularity seed s, routing s + 1, bias s + 1000)."""
    layout = topo.layout
    E, N, G = layout.num_experts, layout.num_nodes, layout.gpus_per_node
    kwargs = {
        k: getattr(topo, k)
        for k in ("hidden", "dispatch_bytes", "combine_bytes", "nvlink_gbps", "ib_gbps")
    }
    for r in redundant:
        check_redundant(r, E, N, N)  # node-limited strategies: one group per node
    rows = []
    for seed in seeds:
        popularity_E = expert_popularity(E, skew, seed)
        for name, (router, with_bias) in SYNTHETIC.items():
            cfg = (
                None if router == "uniform" else strategy_config(router, layout, top_k, group_limit)
            )
            bias_E = (
                train_bias(cfg, popularity_E, bias_steps, 4096, bias_rate, seed + 1000)
                if with_bias and bias_steps
                else None
            )
            experts_TK = synthetic_experts(
                router,
                topo.num_devices * tokens_per_gpu,
                layout,
                top_k,
                seed + 1,
                popularity_E,
                cfg,
                bias_E,
            )
            groups = N if router == "node_limited" else 1
            for row in fit_and_judge(experts_TK[None], E, N, G, redundant, groups, **kwargs):
                rows.append({"dataset": "synthetic", "strategy": name, "seed": seed, **row})
    return rows


def summary(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (dataset, strategy, rule, R): seeds n, <metric>_mean / _ci95 over seeds of
    the per-seed mean over layers, and `gain` = contiguous minus this rule's held-out
    busiest/mean, paired by seed (`gain_mean`, `gain_ci95`)."""
    per_seed = pd.DataFrame(rows).groupby([*KEYS, "seed"], as_index=False)[list(METRICS)].mean()
    base = per_seed[per_seed["rule"] == "contiguous"].set_index(
        ["dataset", "strategy", "redundant", "seed"]
    )["busiest_over_mean"]
    per_seed["gain"] = (
        base.reindex(
            pd.MultiIndex.from_frame(per_seed[["dataset", "strategy", "redundant", "seed"]])
        ).to_numpy()
        - per_seed["busiest_over_mean"].to_numpy()
    )
    out = []
    for dataset, part in per_seed.groupby("dataset", sort=True):
        for strategy in _order(set(part["strategy"])):
            for r in sorted(set(part["redundant"])):
                for rule in RULES:
                    sel = part[
                        (part["strategy"] == strategy)
                        & (part["redundant"] == r)
                        & (part["rule"] == rule)
                    ]
                    if sel.empty:
                        continue
                    row: dict[str, Any] = {
                        "dataset": dataset,
                        "strategy": strategy,
                        "rule": rule,
                        "redundant": int(r),
                        "n": len(sel),
                    }
                    for col in (*METRICS, "gain"):
                        row[f"{col}_mean"], row[f"{col}_ci95"] = mean_ci95(sel[col].to_numpy())
                    out.append(row)
    return pd.DataFrame(out)


def markdown(table: pd.DataFrame, header: str = "") -> str:
    """The summary as a Markdown table (mean ± 95% CI over seeds)."""
    columns = {
        "busiest_over_mean": ("busiest/mean (held-out)", 3),
        "gain": ("gain vs contiguous", 3),
        "fit_busiest_over_mean": ("busiest/mean (fitted)", 3),
        "nodes_per_token": ("nodes/token", 3),
        "ib_bytes_per_token": ("IB B/token", 0),
        "nvlink_bytes_per_token": ("NVLink B/token", 0),
        "a2a_time_modeled_us": ("a2a µs (model)", 1),
    }
    names = ["dataset", "strategy", "rule", "R", "n", *(c[0] for c in columns.values())]
    rows = [
        [r["dataset"], r["strategy"], r["rule"], r["redundant"], r["n"]]
        + [fmt(r[f"{k}_mean"], r[f"{k}_ci95"], d) for k, (_, d) in columns.items()]
        for _, r in table.iterrows()
    ]
    return header + markdown_table(names, rows, align="lll" + "r" * (len(names) - 3)) + "\n"


def figure(table: pd.DataFrame, stem: Path) -> None:
    """Held-out busiest/mean GPU load per strategy, one bar per rule (95% CI over seeds),
    a panel per (dataset, R); written as `stem`.png and `stem`.svg (no dates: same bytes
    for the same table)."""
    datasets = sorted(set(table["dataset"]))
    rs = sorted(set(table["redundant"]))
    fig = Figure(figsize=(4.5 * len(rs), 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(rs), squeeze=False)
    width = 0.8 / len(RULES)
    for i, dataset in enumerate(datasets):
        for j, r in enumerate(rs):
            ax = axes[i, j]
            part = table[(table["dataset"] == dataset) & (table["redundant"] == r)]
            order = _order(set(part["strategy"]))
            for k, rule in enumerate(RULES):
                sel = part[part["rule"] == rule].set_index("strategy").reindex(order)
                ax.bar(
                    np.arange(len(order)) + (k - (len(RULES) - 1) / 2) * width,
                    sel["busiest_over_mean_mean"],
                    width,
                    yerr=sel["busiest_over_mean_ci95"].fillna(0),
                    label=rule,
                )
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xticks(np.arange(len(order)), order, rotation=35, ha="right", fontsize=8)
            ax.set_ylim(bottom=0.9)
            ax.set_title(f"{dataset}, R = {r}", fontsize=9)
            ax.set_ylabel("busiest / mean GPU load")
    axes[0, 0].legend(fontsize=8)
    metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
    with matplotlib.rc_context({"svg.hashsalt": "moebench"}):
        for suffix, meta in metadata.items():
            with atomic_path(stem.with_suffix(f".{suffix}")) as tmp:
                fig.savefig(tmp, format=suffix, dpi=120, metadata=meta)
