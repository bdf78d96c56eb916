"""Figures of one (study, dataset), drawn on bare `Figure`s (Agg canvas, no pyplot state, no
display; same bytes for the same inputs): MaxVio_batch over training steps, expert load per
layer, validation perplexity against MaxVio_global, and nodes/devices touched per token."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from moebench.io import atomic_path
from moebench.report.tables import strategy_order

_PNG_METADATA = {"Software": None}
"""No version string in the PNG: bytes depend on the pixels only."""
_LOG_FLOOR = 1e-3
"""MaxVio values are drawn on log axes; an exact 0 (perfect balance) is shown at this floor."""


def _log_axis(axis: matplotlib.axis.Axis) -> None:
    """Ticks at 1, 2, 5 x 10^n with plain-number labels (0.1, 0.2, 0.5, 1, 2) on a log axis."""
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(NullFormatter())


def _colors(strategies: list[str]) -> dict[str, tuple[float, float, float, float]]:
    cmap = matplotlib.colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(strategies)}


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata=_PNG_METADATA)


def maxvio_curves(curves: pd.DataFrame, path: Path, smooth: int = 5) -> None:
    """MaxVio_batch (mean over layers) against step, one line per strategy: mean over seeds,
    then a centred moving average over `smooth` logged steps ([LF] Fig. 3 averages over
    100 neighbouring steps; our runs are short)."""
    order = strategy_order(set(curves["strategy"]))
    colors = _colors(order)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for strategy in order:
        per_step = curves[curves["strategy"] == strategy].groupby("step")["maxvio_batch"].mean()
        smoothed = per_step.rolling(smooth, center=True, min_periods=1).mean()
        ax.plot(
            smoothed.index, smoothed.clip(lower=_LOG_FLOOR), label=strategy, color=colors[strategy]
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax.set_yscale("log")
    _log_axis(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def load_heatmaps(loads: dict[str, tuple[int, np.ndarray]], path: Path) -> None:
    """Relative validation load (load / mean load of the layer) of each expert in each MoE
    layer, one panel per strategy, from one run each (`loads`: strategy -> (seed, load_LE));
    1 is perfect balance. One seed, not a mean: seeds overload different experts, and a
    mean over them would hide the imbalance."""
    order = strategy_order(set(loads))
    ncols = min(4, len(order))
    nrows = -(-len(order) // ncols)
    rel = {s: loads[s][1] / loads[s][1].mean(axis=1, keepdims=True) for s in order}
    vmax = max(2.0, max(float(r.max()) for r in rel.values()))
    fig = Figure(figsize=(2.4 * ncols + 1.2, 2.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    image = None
    for ax, strategy in zip(axes.flat, order, strict=False):
        layers, experts = rel[strategy].shape
        image = ax.imshow(
            rel[strategy].T, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, origin="lower"
        )
        ax.set_title(f"{strategy} (seed {loads[strategy][0]})", fontsize=9)
        ax.set_xticks(range(layers))
        ax.set_yticks(range(0, experts, max(1, experts // 8)))
    for ax in axes[-1, :]:
        ax.set_xlabel("MoE layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("expert")
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="load / mean load of the layer")
    _save(fig, path)


def ppl_vs_maxvio(df: pd.DataFrame, path: Path) -> None:
    """Validation perplexity against MaxVio_global: one dot per run, a cross per strategy mean."""
    order = strategy_order(set(df["strategy"]))
    colors = _colors(order)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for strategy in order:
        part = df[df["strategy"] == strategy]
        vio = part["maxvio_global"].clip(lower=_LOG_FLOOR)
        c = colors[strategy]
        ax.scatter(vio, part["val_ppl"], color=c, alpha=0.4, s=14)
        ax.scatter(
            vio.mean(),
            part["val_ppl"].mean(),
            color=c,
            marker="X",
            s=70,
            label=strategy,
            edgecolors="black",
            linewidths=0.5,
        )
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("MaxVio_global (validation, mean over MoE layers)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    _save(fig, path)


def nodes_per_token(st: pd.DataFrame, path: Path) -> None:
    """Mean nodes and devices a token's routed experts touch, per strategy (95% CI bars)."""
    x = np.arange(len(st))
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for offset, col, label in (
        (-0.2, "nodes_per_token", "nodes / token"),
        (0.2, "devices_per_token", "devices / token"),
    ):
        ax.bar(
            x + offset,
            st[f"{col}_mean"],
            width=0.4,
            label=label,
            yerr=st[f"{col}_ci95"].fillna(0.0),
            capsize=3,
        )
    ax.set_xticks(x, st["strategy"], rotation=30, ha="right")
    ax.set_ylabel("mean per token (validation trace)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, path)
