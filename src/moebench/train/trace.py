"""The routing trace: which experts every token of a fixed validation slice used, per MoE
layer, as a long-format Parquet table that the communication stage replays.

Columns (one row per (layer, token, slot)): layer int16 (index among MoE layers), token
int32 (position in the slice), slot int8 (0..K-1, in the router's order), expert int16,
weight float32 (the gate). The schema metadata under key b"moebench" is JSON with
num_experts, top_k, num_nodes, gpus_per_node, d_model, limit, group_limit (the contract),
plus num_layers, first_moe_layer, seq_len and num_tokens.

Legend: L MoE layers, T tokens of the slice, K experts per token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import torch

from moebench.config import RunConfig
from moebench.io import write_parquet

TRACE_META_KEY = b"moebench"


def trace_table(experts_LTK: torch.Tensor, weights_LTK: torch.Tensor, cfg: RunConfig,
                seq_len: int) -> pa.Table:
    """Long-format table of the routing (see the module docstring) with its metadata."""
    L, T, K = experts_LTK.shape
    layer = torch.arange(L, dtype=torch.int16)[:, None, None].expand(L, T, K)
    token = torch.arange(T, dtype=torch.int32)[None, :, None].expand(L, T, K)
    slot = torch.arange(K, dtype=torch.int8)[None, None, :].expand(L, T, K)
    meta = {
        "num_experts": cfg.router.num_experts,
        "top_k": cfg.router.top_k,
        "num_nodes": cfg.topology.num_nodes,
        "gpus_per_node": cfg.topology.gpus_per_node,
        "d_model": cfg.model.d_model,
        "limit": cfg.router.limit,
        "group_limit": cfg.router.group_limit,
        "num_layers": L,
        "first_moe_layer": cfg.model.n_dense_layers,
        "seq_len": seq_len,
        "num_tokens": T,
    }
    columns = {
        "layer": pa.array(layer.reshape(-1).numpy(), pa.int16()),
        "token": pa.array(token.reshape(-1).numpy(), pa.int32()),
        "slot": pa.array(slot.reshape(-1).numpy(), pa.int8()),
        "expert": pa.array(experts_LTK.reshape(-1).to(torch.int16).numpy(), pa.int16()),
        "weight": pa.array(weights_LTK.reshape(-1).float().numpy(), pa.float32()),
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({TRACE_META_KEY: json.dumps(meta, sort_keys=True)})


def write_trace(path: Path, experts_LTK: torch.Tensor, weights_LTK: torch.Tensor,
                cfg: RunConfig, seq_len: int) -> None:
    """Write `trace_table(...)` atomically to `path`."""
    write_parquet(path, trace_table(experts_LTK.cpu(), weights_LTK.cpu(), cfg, seq_len))
