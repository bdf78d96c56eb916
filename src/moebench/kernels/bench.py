"""Benchmark plumbing shared by `benchmarks/router.py` and `benchmarks/moe_layer.py`:
environment columns, the measured copy bandwidth (the HBM floor's denominator), CUDA-graph
timing with rotating inputs, and long-format Parquet + Markdown output.

Timing method (METHOD.md): warm up (compiles, autotuning, allocator), capture `calls`
invocations in one CUDA graph (so launch overhead and host gaps stay out and the GPU time is
measured), cycling through several input sets so that repeated runs do not hit a warm L2,
then replay the graph `reps` times between CUDA events; per-call time = replay / calls.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import triton

from moebench.io import write_parquet, write_text
from moebench.report.markdown import records_table


def env_columns() -> dict[str, str]:
    """Columns that identify the machine and software of every result row."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "gpu": gpu,
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "cuda_version": str(torch.version.cuda),
        "git_sha": os.environ.get("MOEBENCH_GIT_SHA", "unknown"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def time_graph(
    fn: Callable[[int], Any], num_inputs: int, calls: int = 20, reps: int = 30, warmup: int = 3
) -> dict[str, float]:
    """GPU time of `fn(i)` (i = input-set index) in microseconds: median, p20, p80."""
    for i in range(warmup * num_inputs):
        fn(i % num_inputs)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn(0)  # allocator warm-up on the side stream
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fn(i % num_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    del graph
    return {"median_us": q[0], "p20_us": q[1], "p80_us": q[2]}


def load_baseline(path: str | Path, name: str) -> Any:
    """Import a saved earlier version of a kernels module (e.g. `git show REV:FILE`) under
    `name`, to time it beside the current one in the same run ("before/after")."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"baseline path={str(path)!r} is invalid; allowed: a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written: the
    faster of a memcpy and an element-wise float32 copy kernel (the floor stays strict)."""
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    copies = (lambda _i: dst.copy_(src), lambda _i: torch.mul(src, 1.0, out=dst))
    best = min(time_graph(fn, num_inputs=1, calls=5, reps=20)["median_us"] for fn in copies)
    return 2 * nbytes / (best * 1e-6)


def write_results(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, name: str, md_columns: Sequence[str]
) -> None:
    """`<name>.parquet` (every column) and `<name>.md` (the chosen columns) under out_dir."""
    out_dir = Path(out_dir)
    write_parquet(out_dir / f"{name}.parquet", pa.Table.from_pylist(list(rows)))
    env = rows[0]
    head = (
        f"# {name}\n\n{env['gpu']}; torch {env['torch_version']}, triton "
        f"{env['triton_version']}, CUDA {env['cuda_version']}; {env['date']}\n\n"
    )
    write_text(out_dir / f"{name}.md", head + records_table(rows, md_columns) + "\n")
