"""`moebench kernels --output FILE`: check the fused router against the PyTorch reference on the
available device (the CUDA GPU, else the Triton interpreter on CPU) over a small grid, and
write one row per case (machine, device, case, tokens, max gate error, ids equal, load equal).
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import torch
import typer

from moebench.io import write_parquet

CASES = {  # name -> (preset, overrides, bias)
    "v3": ("v3", {}, True),
    "v2": ("v2", {}, False),
    "e64": ("v2-lite", {}, False),
    "wang_mul": ("wang", {"bias_mode": "mul"}, True),
}


def check_cases(device: torch.device, tokens: int = 257, seed: int = 0) -> list[dict]:
    """Kernel vs `moebench.routing.route` on `device`, one row per case."""
    from moebench.kernels.router import route_fused
    from moebench.routing import gate_weights, preset, scores, select_experts, selection_key

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, (base, overrides, with_bias) in CASES.items():
        cfg = preset(base, **overrides)
        logits = torch.randn(tokens, cfg.num_experts, generator=gen).to(device)
        bias = None
        if with_bias:
            bias = 0.1 * torch.randn(cfg.num_experts, generator=gen)
            bias = (bias + 1.0 if cfg.bias_mode == "mul" else bias).to(device)
        fused = route_fused(logits, cfg, bias)
        # the PyTorch reference (`route` itself dispatches to the kernel on CUDA)
        s = scores(logits, cfg.score_fn)
        ref_experts = select_experts(selection_key(s, bias, cfg), cfg)
        ref_weights = gate_weights(s, ref_experts, cfg)
        w_f = fused.weights.gather(1, fused.experts.argsort(1))
        w_r = ref_weights.gather(1, ref_experts.argsort(1))
        load = torch.bincount(ref_experts.flatten(), minlength=cfg.num_experts)
        rows.append(
            {
                "machine": platform.node(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "case": name,
                "tokens": tokens,
                "ids_equal": bool(
                    torch.equal(fused.experts.sort(1).values, ref_experts.sort(1).values)
                ),
                "max_weight_err": float((w_f - w_r).abs().max()),
                "load_equal": bool(torch.equal(fused.load, load)),
            }
        )
    return rows


def kernels(
    output: Annotated[Path, typer.Option(help="Parquet file to write")],
    tokens: Annotated[int, typer.Option(help="tokens per case")] = 257,
) -> None:
    """Check the fused router against the reference; fail if any case disagrees."""
    if tokens < 1:
        raise typer.BadParameter(f"tokens={tokens} is invalid; allowed: an integer >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = check_cases(device, tokens)
    write_parquet(output, pa.Table.from_pylist(rows))
    for r in rows:
        typer.echo(
            f"{r['case']:9s} ids_equal={r['ids_equal']} load_equal={r['load_equal']} "
            f"max_weight_err={r['max_weight_err']:.2e}"
        )
    if not all(r["ids_equal"] and r["load_equal"] for r in rows):
        raise typer.Exit(1)
