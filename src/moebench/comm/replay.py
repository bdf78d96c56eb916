"""Replay of routing onto a topology: recorded traces (`routing_trace.parquet`, written by
`moebench.train.trace`) and synthetic routing at cluster scale (V3: 256 experts on 8 nodes x
8 GPUs; 2048 GPUs), producing the per-layer tables of `moebench.comm.accounting`.

Synthetic strategies (routing by `moebench.routing.route`, never re-implemented here):
- "uniform": k distinct experts drawn uniformly per token (the analytic baseline's model).
- "unrestricted": top-k of skewed synthetic logits (no group limit).
- "device_limited": [V2] §2.2.2, at most M GPUs per token, GPUs ranked by their best score
  (preset "v2": softmax, group score max).
- "node_limited": [V3] §2.1.2, at most M nodes per token, nodes ranked by the sum of the top
  K/M biased scores (preset "v3"), with an aux-loss-free bias trained on the same logit
  distribution by `moebench.balancing.update_bias` ([V3] §2.1.2).
Skewed logits: z_te = x_te + p_e, x ~ N(0, 1) per token and expert, p_e = skew * N(0, 1)
a fixed per-expert popularity (ours: a simple stand-in for trained routers' imbalance).

Legend: L layers, T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moebench.balancing import update_bias
from moebench.comm.accounting import DISPATCHERS, expected_groups_uniform, summarize, traffic
from moebench.comm.topology import Topology
from moebench.config import Int, describe_errors
from moebench.metrics import expert_load, max_vio
from moebench.progress import progress
from moebench.routing import Layout, RouterConfig, preset, route

TRACE_META_KEY = b"moebench"
STRATEGIES = ("uniform", "unrestricted", "device_limited", "node_limited")
GEN_CHUNK = 16384  # tokens per generated batch (bounds the [T, E] logits in memory)
# comm.json keys: the headline numbers of the "dedup" dispatcher, "per_expert" with a suffix.
SUMMARY_KEYS = (
    "devices_per_token",
    "nodes_per_token",
    "nvlink_bytes_per_token",
    "ib_bytes_per_token",
    "nvlink_dispatch_bytes_per_token",
    "ib_dispatch_bytes_per_token",
    "nvlink_combine_bytes_per_token",
    "ib_combine_bytes_per_token",
    "a2a_dispatch_us",
    "a2a_combine_us",
    "a2a_time_modeled_us",
)


@dataclass(frozen=True)
class Trace:
    """A routing trace: `experts` int16 [L, T, K] (layer = index among MoE layers) and
    the trace's metadata (num_experts, top_k, num_nodes, gpus_per_node, d_model, ...)."""

    experts: np.ndarray
    meta: dict[str, Any]


class TraceMeta(BaseModel):
    """The sizes a trace's schema metadata must state (other keys are kept as written)."""

    model_config = ConfigDict(extra="allow")

    num_experts: Int = Field(ge=1)
    top_k: Int = Field(ge=1)
    num_nodes: Int = Field(ge=1)
    gpus_per_node: Int = Field(ge=1)
    d_model: Int = Field(ge=1)
    num_layers: Int = Field(ge=0)
    num_tokens: Int = Field(ge=0)


def _trace_meta(path: Path, table: pa.Table) -> dict[str, Any]:
    """The trace's metadata, checked against `TraceMeta`; ValueError naming the key."""
    raw = (table.schema.metadata or {}).get(TRACE_META_KEY)
    if raw is None:
        raise ValueError(f"trace={path} has no schema metadata key {TRACE_META_KEY!r}")
    try:
        meta = json.loads(raw)
        TraceMeta.model_validate(meta)
    except ValueError as err:  # json.JSONDecodeError and pydantic.ValidationError
        problems = (
            describe_errors(err, TraceMeta) if isinstance(err, ValidationError) else [str(err)]
        )
        raise ValueError(
            f"trace={path} has invalid metadata {TRACE_META_KEY!r}: {'; '.join(problems)}; "
            "rerun `moebench train` for this run"
        ) from None
    return meta


def _trace_column(path: Path, table: pa.Table, name: str, size: int) -> np.ndarray:
    """Column `name` as int64; ValueError unless it holds integers in 0..size-1, no nulls."""
    if name not in table.column_names:
        raise ValueError(f"trace={path} lacks column {name!r}; allowed: a routing trace with "
                         "columns layer, token, slot, expert")
    column = table.column(name)
    if not pa.types.is_integer(column.type) or column.null_count:
        raise ValueError(
            f"trace={path} column {name!r} has type {column.type} with {column.null_count} "
            "nulls; allowed: integers without nulls"
        )
    values = column.to_numpy().astype(np.int64)
    if len(values) and (values.min() < 0 or values.max() >= size):
        raise ValueError(
            f"trace={path} column {name!r} holds {values.min()}..{values.max()}; allowed: "
            f"0..{size - 1}"
        )
    return values


def read_trace(path: str | Path) -> Trace:
    """Read `routing_trace.parquet`; ValueError naming the file, the column or metadata key
    and the allowed values unless the metadata states its sizes and every (layer, token, slot)
    of the [L, T, K] grid appears exactly once with an expert id in 0..E-1. A dense model's
    trace (num_layers = 0, no rows) reads as experts [0, num_tokens, K]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace={path} does not exist; allowed: a routing_trace.parquet file")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(
            f"trace={path} is not a readable Parquet file ({err}); rerun `moebench train` "
            "for this run"
        ) from None
    meta = _trace_meta(path, table)
    L, T, K = meta["num_layers"], meta["num_tokens"], meta["top_k"]
    sizes = {"layer": L, "token": T, "slot": K, "expert": meta["num_experts"]}
    col = {name: _trace_column(path, table, name, size) for name, size in sizes.items()}
    flat = (col["layer"] * T + col["token"]) * K + col["slot"]
    if len(flat) != L * T * K or not (np.bincount(flat, minlength=L * T * K) == 1).all():
        raise ValueError(
            f"trace={path} does not hold every (layer, token, slot) of a [L={L}, T={T}, K={K}] "
            "grid exactly once; allowed: a complete routing trace"
        )
    experts_LTK = np.empty(L * T * K, np.int16)
    experts_LTK[flat] = col["expert"]
    return Trace(experts_LTK.reshape(L, T, K), meta)


def replay_layers(
    experts_LTK: np.ndarray, topo: Topology, threads: int | None = None
) -> list[dict[str, Any]]:
    """Full accounting (`traffic` + `summarize`) of every layer: one row per (layer, dispatcher)."""
    rows = []
    with progress(f"accounting on {topo.name}", "layer", experts_LTK) as layers:
        for layer, experts_TK in enumerate(layers):
            tr = traffic(experts_TK, topo, threads=threads)
            for row in summarize(tr.token_stats(topo), topo, tr):
                rows.append({"layer": layer, **row})
    return rows


def comm_summary(rows: list[dict[str, Any]], topo: Topology) -> dict[str, Any]:
    """comm.json: mean over layers of the per-layer figures (bytes and time per MoE layer),
    "dedup" plain and "per_expert" with the suffix `_per_expert` (GPUs and nodes per token
    do not depend on the dispatcher: no suffixed copy), plus the topology used. Without
    rows (a dense model: no MoE layer, no all-to-all) every figure is null."""
    out: dict[str, Any] = {
        "num_nodes": topo.num_nodes,
        "gpus_per_node": topo.gpus_per_node,
        "num_experts": topo.layout.num_experts,
        "hidden": topo.hidden,
        "dispatch_bytes": topo.dispatch_bytes,
        "combine_bytes": topo.combine_bytes,
        "nvlink_gbps": topo.nvlink_gbps,
        "ib_gbps": topo.ib_gbps,
        "source_gpu": "contiguous blocks: token t of T on GPU floor(t * D / T)",
        "num_layers": len({r["layer"] for r in rows}),
    }
    for name in DISPATCHERS:
        suffix = "" if name == "dedup" else f"_{name}"
        mine = [r for r in rows if r["dispatcher"] == name]
        for key in SUMMARY_KEYS if name == "dedup" else SUMMARY_KEYS[2:]:  # GPUs/nodes: once
            out[key + suffix] = float(np.mean([r[key] for r in mine])) if mine else None
    out["tokens"] = rows[0]["tokens"] if rows else None
    return out


def expert_popularity(num_experts: int, skew: float, seed: int) -> torch.Tensor:
    """float32 [E]: p_e = skew * N(0, 1), fixed by `seed` (the skew of synthetic logits)."""
    gen = torch.Generator().manual_seed(seed)
    return skew * torch.randn(num_experts, generator=gen)


def skewed_logits(
    num_tokens: int, popularity_E: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """float32 [T, E]: z = N(0, 1) noise + the per-expert popularity."""
    return torch.randn(num_tokens, len(popularity_E), generator=gen) + popularity_E


def strategy_config(strategy: str, layout: Layout, top_k: int, group_limit: int) -> RouterConfig:
    """The router of a synthetic strategy (module docstring); "uniform" has none (ValueError)."""
    E = layout.num_experts
    if strategy == "unrestricted":
        return preset("v3", num_experts=E, top_k=top_k, num_groups=1)
    if strategy == "device_limited":
        return preset(
            "v2", num_experts=E, top_k=top_k, num_groups=layout.num_devices, group_limit=group_limit
        )
    if strategy == "node_limited":
        return preset(
            "v3",
            num_experts=E,
            top_k=top_k,
            num_groups=layout.num_nodes,
            group_limit=group_limit,
            group_score="topk_sum",
        )
    raise ValueError(
        f"strategy={strategy!r} has no router; allowed: 'unrestricted', 'device_limited', "
        "'node_limited'"
    )


def train_bias(
    cfg: RouterConfig,
    popularity_E: torch.Tensor,
    steps: int,
    batch_tokens: int,
    rate: float,
    seed: int,
) -> torch.Tensor:
    """Aux-loss-free bias after `steps` sign updates ([V3] §2.1.2), each on the load of a fresh
    batch of skewed logits routed with the current bias."""
    gen = torch.Generator().manual_seed(seed)
    bias_E = torch.zeros(cfg.num_experts)
    for _ in range(steps):
        experts_TK = route(skewed_logits(batch_tokens, popularity_E, gen), cfg, bias_E).experts
        bias_E = update_bias(bias_E, expert_load(experts_TK, cfg.num_experts), rate)
    return bias_E


def synthetic_experts(
    strategy: str,
    num_tokens: int,
    layout: Layout,
    top_k: int,
    seed: int,
    popularity_E: torch.Tensor | None = None,
    cfg: RouterConfig | None = None,
    bias_E: torch.Tensor | None = None,
) -> np.ndarray:
    """int16 [T, K] routing of a synthetic strategy, generated in batches of GEN_CHUNK tokens.
    "uniform" needs no router; the others route skewed logits with `cfg` (and `bias_E`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid; allowed: {', '.join(STRATEGIES)}")
    if strategy != "uniform" and (cfg is None or popularity_E is None):
        raise ValueError(f"strategy={strategy!r} needs cfg and popularity_E")
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for lo in range(0, num_tokens, GEN_CHUNK):
        n = min(GEN_CHUNK, num_tokens - lo)
        if strategy == "uniform":
            experts = torch.rand(n, layout.num_experts, generator=gen).topk(top_k).indices
        else:
            experts = route(skewed_logits(n, popularity_E, gen), cfg, bias_E).experts
        parts.append(experts.to(torch.int16).numpy())
    return np.concatenate(parts)


def replay_synthetic(
    topo: Topology,
    strategies: tuple[str, ...] = STRATEGIES,
    tokens_per_gpu: int = 4096,
    top_k: int = 8,
    group_limit: int = 4,
    skew: float = 0.25,
    bias_steps: int = 300,
    bias_rate: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Synthetic routing of every strategy replayed onto `topo` (T = D * tokens_per_gpu
    tokens, one layer): one row per (strategy, dispatcher) with the `summarize` figures plus
    topology, strategy, routing shape, MaxVio of the routing and the uniform analytic
    expectation of nodes and GPUs per token."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies={unknown} are invalid; allowed: {', '.join(STRATEGIES)}")
    E = topo.layout.num_experts
    for name, value, ok, allowed in (
        ("top_k", top_k, 1 <= top_k <= E, f"1..{E} (the experts)"),
        ("tokens_per_gpu", tokens_per_gpu, tokens_per_gpu >= 1, "an integer >= 1"),
        ("skew", skew, math.isfinite(skew) and skew >= 0, "a finite number >= 0"),
        ("bias_steps", bias_steps, bias_steps >= 0, "an integer >= 0"),
    ):
        if not ok:
            raise ValueError(f"{name}={value} is invalid; allowed: {allowed}")
    layout = topo.layout
    T = topo.num_devices * tokens_per_gpu
    popularity_E = expert_popularity(layout.num_experts, skew, seed)
    rows = []
    with progress(f"replaying on {topo.name}", "strategy", strategies) as bar:
        for i, strategy in enumerate(bar):
            cfg = None if strategy == "uniform" else strategy_config(
                strategy, layout, top_k, group_limit
            )
            bias_E = None
            if strategy == "node_limited" and bias_steps:
                bias_E = train_bias(cfg, popularity_E, bias_steps, 4096, bias_rate, seed + 1000)
            experts_TK = synthetic_experts(
                strategy, T, layout, top_k, seed + 1 + i, popularity_E, cfg, bias_E
            )
            tr = traffic(experts_TK, topo, threads=threads)
            stats = tr.token_stats(topo)
            load_E = expert_load(torch.from_numpy(experts_TK.astype(np.int64)), layout.num_experts)
            for row in summarize(stats, topo, tr):
                rows.append(
                    {
                        "topology": topo.name,
                        "strategy": strategy,
                        "num_experts": layout.num_experts,
                        "top_k": top_k,
                        "group_limit": group_limit if strategy.endswith("_limited") else None,
                        "bias_steps": bias_steps if bias_E is not None else 0,
                        "max_vio": max_vio(load_E),
                        "uniform_nodes_expected": expected_groups_uniform(
                            layout.num_experts, layout.num_nodes, top_k
                        ),
                        **row,
                    }
                )
    return rows
