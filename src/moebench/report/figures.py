"""Figures of one (study, dataset), drawn on bare `Figure`s (Agg canvas, no pyplot state, no
display) and saved as PNG plus SVG beside it (same bytes for the same inputs): MaxVio_batch
over steps with CI bands, per-layer expert load, the perplexity/MaxVio trade-off across
balance strengths, nodes and devices per token, the M sweep, and domain specialisation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from moebench.io import atomic_path
from moebench.report.stats import mean_ci95, strategy_order

FORMATS = ("png", "svg")
"""Every figure is written as a PNG and, beside it, a vector SVG."""
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
"""No version string or date in the files: bytes depend on the drawing only."""
_LOG_FLOOR = 1e-3
"""MaxVio values are drawn on log axes; an exact 0 (perfect balance) is shown at this floor."""
_RATIO_CMAP = "RdBu_r"
"""Diverging colours for ratios centred on 1 (blue below, red above)."""


def _log_axis(axis: matplotlib.axis.Axis) -> None:
    """Ticks at 1, 2, 5 x 10^n with plain-number labels (0.001, 0.1, 0.2, 1, 2) on a log axis:
    each label its own shortest form, never a shared number of decimals (0.00 for 0.001)."""
    axis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _colors(names: list[str]) -> dict[str, tuple[float, float, float, float]]:
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


def figure_paths(path: Path) -> list[Path]:
    """The files one figure is saved to: `path` (.png) and its vector twin."""
    return [path.with_suffix(f".{fmt}") for fmt in FORMATS]


def _save(fig: Figure, path: Path) -> None:
    with matplotlib.rc_context({"svg.hashsalt": "moebench", "svg.fonttype": "none"}):
        for out, fmt in zip(figure_paths(path), FORMATS, strict=True):
            with atomic_path(out) as tmp:
                fig.savefig(tmp, format=fmt, dpi=120, metadata=_METADATA[fmt])


def _ratio_norm(values: list[np.ndarray]) -> TwoSlopeNorm:
    """A colour scale from 0 to at least 2, centred on 1."""
    vmax = max(2.0, *(float(np.nanmax(v)) for v in values if np.isfinite(v).any()))
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols + 1.2, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _save_heatmaps(fig: Figure, axes: np.ndarray, image: Any, label: str, path: Path) -> None:
    """Label a grid of layer x expert heatmaps, add the colour bar of `image`, save."""
    for ax in axes[-1, :]:
        ax.set_xlabel("MoE layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("expert")
    fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    _save(fig, path)


def _mean_band(ax: Any, x: Any, values_XS: np.ndarray, color: Any, label: str,
               floor: float = -np.inf, **line: Any) -> np.ndarray:
    """The mean over seeds (columns) of each row as a line, its 95% CI as a band; values
    below `floor` are drawn at it (a log axis). Returns the drawn means."""
    mean, half = np.array([mean_ci95(row) for row in values_XS]).T
    mean = np.clip(mean, floor, None)
    ax.plot(x, mean, label=label, color=color, **line)
    if np.isfinite(half).any():
        lo, hi = np.clip(mean - half, floor, None), np.clip(mean + half, floor, None)
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    return mean


def _by_strategy(
    frame: pd.DataFrame, index: str, values: str
) -> Iterator[tuple[str, Any, pd.DataFrame]]:
    """Per strategy of `frame` (canonical order) with rows: its colour and `values` by
    `index` (rows) and seed (columns)."""
    order = strategy_order(set(frame["strategy"]))
    colors = _colors(order)
    for strategy in order:
        by_seed = frame[frame["strategy"] == strategy].pivot_table(
            index=index, columns="seed", values=values
        )
        if not by_seed.empty:  # a dense model has no expert load
            yield strategy, colors[strategy], by_seed


def maxvio_curves(curves: pd.DataFrame, path: Path, smooth: int = 5) -> None:
    """MaxVio_batch (mean over layers) against step per strategy: each seed's curve smoothed
    by a centred moving average over `smooth` logged steps ([LF] Fig. 3 averages over 100
    neighbouring steps), then the mean over seeds with its 95% CI as a band. Runs without
    MaxVio (a dense model) are left out. The axis starts at half the lowest mean: a band
    whose CI reaches 0 (few seeds) runs off the bottom instead of squashing the curves."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    lowest = np.inf
    for strategy, color, by_seed in _by_strategy(curves.dropna(subset=["maxvio_batch"]),
                                                 "step", "maxvio_batch"):
        smoothed = by_seed.rolling(smooth, center=True, min_periods=1).mean().to_numpy()
        mean = _mean_band(ax, by_seed.index, smoothed, color, strategy, floor=_LOG_FLOOR)
        lowest = min(lowest, float(np.nanmin(mean)))
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio_batch (mean over MoE layers)")
    ax.set_yscale("log")
    if np.isfinite(lowest):
        ax.set_ylim(bottom=lowest / 2)
    _log_axis(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def load_heatmaps(loads: dict[str, tuple[int, np.ndarray]], path: Path) -> None:
    """Relative validation load (load / mean load of the layer) of each expert in each MoE
    layer, one panel per strategy, from one run each (`loads`: strategy -> (seed, load_LE)),
    on a diverging scale centred on 1 (perfect balance). One seed, not a mean: seeds overload
    different experts, and a mean over them would hide the imbalance."""
    order = strategy_order(set(loads))
    rel = {s: loads[s][1] / loads[s][1].mean(axis=1, keepdims=True) for s in order}
    norm = _ratio_norm(list(rel.values()))
    fig, axes = _grid(len(order), min(4, len(order)), (2.4, 2.9))
    image = None
    for ax, strategy in zip(axes.flat, order, strict=False):
        layers, experts = rel[strategy].shape
        image = ax.imshow(
            rel[strategy].T, aspect="auto", cmap=_RATIO_CMAP, norm=norm, origin="lower"
        )
        ax.set_title(f"{strategy} (seed {loads[strategy][0]})", fontsize=9)
        ax.set_xticks(range(layers))
        ax.set_yticks(range(0, experts, max(1, experts // 8)))
    _save_heatmaps(fig, axes, image, "load / mean load of the layer", path)


def _errorbar(
    ax: Axes, x: tuple[float, float], y: tuple[float, float], log_x: bool, **kw: object
) -> None:
    """One point (mean, 95% CI half-width) per axis; on a log x axis the bar stops at the
    floor."""
    xm, xh = x
    xh = 0.0 if np.isnan(xh) else xh
    xerr = [[min(xh, xm - _LOG_FLOOR)], [xh]] if log_x else [[xh], [xh]]
    ax.errorbar(
        [xm],
        [y[0]],
        xerr=xerr,
        yerr=[0.0 if np.isnan(y[1]) else y[1]],
        capsize=3,
        fmt="o",
        markersize=5,
        **kw,
    )


def _family_lines(ax: Axes, points: pd.DataFrame, x: str, y: str, by: list[str], key: str) -> None:
    """Grey lines through the points that agree on `by` (more than one point), in `key`
    order: one balance knob swept, or one limit's M swept."""
    for _, part in points.groupby(by, sort=True):
        if len(part) > 1:
            part = part.sort_values(key)
            ax.plot(part[x], part[y], color="0.6", linewidth=1, zorder=0)


def ppl_vs_maxvio(points: pd.DataFrame, path: Path) -> None:
    """Validation perplexity against MaxVio_global ([LF] Fig. 2): one point per unrestricted
    MoE strategy (a dense model has no MaxVio), mean ± 95% CI over seeds on both axes,
    labelled with its balance knob; the points of one family (same gate, one knob swept)
    joined in knob order. `points`: one row per strategy (strategy, family, knobs,
    knob_value, val_ppl/maxvio_global mean and ci95)."""
    points = points[(points["limit"] == "none") & points["maxvio_global_mean"].notna()].copy()
    points["x"] = points["maxvio_global_mean"].clip(lower=_LOG_FLOOR)
    colors = _colors(list(points["strategy"]))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    _family_lines(ax, points, "x", "val_ppl_mean", ["family"], "knob_value")
    for r in points.itertuples():
        _errorbar(
            ax,
            (r.x, r.maxvio_global_ci95),
            (r.val_ppl_mean, r.val_ppl_ci95),
            True,
            color=colors[r.strategy],
            label=f"{r.strategy} ({r.knobs or 'no balancing'})",
        )
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel("MaxVio_global (validation, mean over MoE layers)")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def nodes_per_token(st: pd.DataFrame, path: Path) -> None:
    """Mean nodes and devices a token's routed experts touch, per strategy (95% CI bars)."""
    x = np.arange(len(st))
    fig = Figure(figsize=(max(7, 0.5 * len(st)), 4), layout="constrained")
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


def _m_label(group_limit: float) -> str:
    return "all" if np.isnan(group_limit) else f"{group_limit:.0f}"


def m_sweep(points: pd.DataFrame, baseline: str, path: Path) -> None:
    """The M sweep ([V2] §2.2.2): validation perplexity against devices per token and nodes
    per token for the device- and node-limited strategies (mean ± 95% CI over seeds, joined
    in M order per limit and balance), with the unrestricted `baseline`'s perplexity CI as a
    band. `points`: one row per strategy, as for `ppl_vs_maxvio`."""
    limited = points[points["limit"] != "none"]
    base = points[points["strategy"] == baseline]
    colors = _colors(list(limited["strategy"]))
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, col, label in zip(
        axes, ("devices_per_token", "nodes_per_token"), ("devices", "nodes"), strict=True
    ):
        if len(base):
            b = base.iloc[0]
            half = 0.0 if np.isnan(b.val_ppl_ci95) else b.val_ppl_ci95
            ax.axhspan(
                b.val_ppl_mean - half,
                b.val_ppl_mean + half,
                color="0.85",
                label=f"{baseline} (baseline) 95% CI",
            )
            ax.axhline(b.val_ppl_mean, color="0.5", linewidth=1)
        _family_lines(
            ax, limited, f"{col}_mean", "val_ppl_mean", ["family", "knobs"], "group_limit"
        )
        for r in limited.itertuples():
            _errorbar(
                ax,
                (getattr(r, f"{col}_mean"), getattr(r, f"{col}_ci95")),
                (r.val_ppl_mean, r.val_ppl_ci95),
                False,
                color=colors[r.strategy],
                label=f"{r.strategy} ({r.limit}, M={_m_label(r.group_limit)})",
            )
        ax.set_xlabel(f"{label} per token (validation trace)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation perplexity")
    axes[1].legend(fontsize=7)
    _save(fig, path)


def domain_share(shares: dict[str, tuple[int, list[str], np.ndarray]], path: Path) -> None:
    """[V3] Fig. 9's analysis: for each strategy (rows; one seed each) and domain (columns),
    p(expert | domain) / p(expert) per MoE layer and expert, on a diverging scale centred on 1
    (the expert serves the domain in proportion). `shares`: strategy -> (seed, domains,
    rel_DLE) from `domains.relative_share`."""
    order = strategy_order(set(shares))
    domains = shares[order[0]][1]
    norm = _ratio_norm([shares[s][2] for s in order])
    fig = Figure(figsize=(2.6 * len(domains) + 1.2, 2.4 * len(order)), layout="constrained")
    axes = fig.subplots(len(order), len(domains), squeeze=False, sharex=True, sharey=True)
    image = None
    for row, strategy in zip(axes, order, strict=True):
        seed, _, rel_DLE = shares[strategy]
        for ax, domain, rel_LE in zip(row, domains, rel_DLE, strict=True):
            image = ax.imshow(rel_LE.T, aspect="auto", cmap=_RATIO_CMAP, norm=norm, origin="lower")
            ax.set_title(f"{strategy} (seed {seed}): {domain}", fontsize=8)
            ax.set_xticks(range(rel_LE.shape[0]))
            ax.yaxis.set_major_locator(MaxNLocator(8, integer=True))
    _save_heatmaps(fig, axes, image, "p(expert | domain) / p(expert)", path)


def specialisation(scores: pd.DataFrame, path: Path) -> None:
    """Specialisation score I(domain; expert) in bits per MoE layer, one line per strategy:
    mean over seeds with its 95% CI as a band (`scores`: strategy, seed, layer, bits)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for strategy, color, by_seed in _by_strategy(scores, "layer", "bits"):
        _mean_band(ax, by_seed.index, by_seed.to_numpy(), color, strategy, marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("I(domain; expert), bits per assignment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
