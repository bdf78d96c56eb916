"""`moebench comm` (account a run's routing trace) and `moebench comm-replay` (replay
synthetic routing onto a large topology). Files are written atomically (`moebench.io`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer

from moebench.comm.replay import (
    STRATEGIES,
    comm_summary,
    read_trace,
    replay_layers,
    replay_synthetic,
)
from moebench.comm.topology import Topology
from moebench.config import CommSettings, StudyConfig, load_study
from moebench.io import (
    check_writable_dir,
    remove_temporaries,
    write_json,
    write_parquet,
    write_text,
)
from moebench.report.markdown import records_table

Nodes = Annotated[int | None, typer.Option(help="nodes (default: the trace's num_nodes)")]
Gpus = Annotated[int | None, typer.Option(help="GPUs per node (default: the trace's)")]
Study = Annotated[
    Path | None,
    typer.Option(help="study YAML: its `comm:` section (and resources.comm.threads) gives "
                 "the options below that are not given"),
]
Hidden = Annotated[int | None, typer.Option(help="elements per token copy (default: d_model)")]
DispatchBytes = Annotated[float | None, typer.Option(help="bytes per element, dispatch (fp8 = 1)")]
CombineBytes = Annotated[float | None, typer.Option(help="bytes per element, combine (bf16 = 2)")]
NvlinkGbps = Annotated[float | None, typer.Option(help="NVLink GB/s per GPU ([V3] §3.2.2)")]
IbGbps = Annotated[float | None, typer.Option(help="InfiniBand GB/s per GPU ([V3] §3.2.2)")]
Threads = Annotated[int | None, typer.Option(help="worker threads (default: all cores)")]


def accounting(study: StudyConfig | None, **given: float | int | None) -> CommSettings:
    """The accounting's payload sizes and bandwidths: the options given, else the study's
    `comm:` section, else CommSettings' defaults (one home for them); `Topology.build`
    checks the options given (its messages name the option and what is allowed)."""
    base = study.comm if study is not None else CommSettings()
    return base.model_copy(update={k: v for k, v in given.items() if v is not None})


def _fail(cmd: str, err: Exception) -> typer.Exit:
    typer.echo(f"moebench {cmd}: error: {err}", err=True)
    return typer.Exit(2)


def comm(
    trace: Annotated[Path, typer.Option(help="routing_trace.parquet of a run")],
    out: Annotated[Path, typer.Option(help="run directory: writes comm.parquet, comm.json")],
    study: Study = None,
    nodes: Nodes = None,
    gpus_per_node: Gpus = None,
    hidden: Hidden = None,
    dispatch_bytes: DispatchBytes = None,
    combine_bytes: CombineBytes = None,
    nvlink_gbps: NvlinkGbps = None,
    ib_gbps: IbGbps = None,
    threads: Threads = None,
) -> None:
    """Account a routing trace on a topology: per layer and dispatcher, GPUs and nodes per
    token, NVLink / IB bytes, busiest GPU and modeled all-to-all time."""
    try:
        cfg = load_study(study) if study is not None else None
        settings = accounting(cfg, hidden=hidden, dispatch_bytes=dispatch_bytes,
                              combine_bytes=combine_bytes, nvlink_gbps=nvlink_gbps,
                              ib_gbps=ib_gbps)
        if threads is None and cfg is not None:
            threads = cfg.resources.comm.threads
        check_writable_dir(out, "--out")
        tr = read_trace(trace)
        meta = tr.meta
        topo = Topology.build(
            int(meta["num_experts"]),
            nodes if nodes is not None else int(meta["num_nodes"]),
            gpus_per_node if gpus_per_node is not None else int(meta["gpus_per_node"]),
            hidden=settings.hidden if settings.hidden is not None else int(meta["d_model"]),
            dispatch_bytes=settings.dispatch_bytes,
            combine_bytes=settings.combine_bytes,
            nvlink_gbps=settings.nvlink_gbps,
            ib_gbps=settings.ib_gbps,
        )
        rows = replay_layers(tr.experts, topo, threads)
        remove_temporaries(out, ("comm.parquet", "comm.json"))  # left by a killed attempt
        write_parquet(out / "comm.parquet", pa.Table.from_pylist(rows))
        summary = comm_summary(rows, topo)
        write_json(out / "comm.json", summary)
    except (ValueError, OSError) as err:
        raise _fail("comm", err) from None
    if not rows:
        typer.echo(f"{out}: no MoE layer (dense model): empty comm.parquet, null comm.json")
        return
    typer.echo(
        f"{out}: {summary['num_layers']} layers on {topo.name}: "
        f"{summary['nodes_per_token']:.3f} nodes/token, "
        f"IB {summary['ib_bytes_per_token']:.1f} B/token (dedup), "
        f"{summary['ib_bytes_per_token_per_expert']:.1f} (per expert)"
    )


REPLAY_COLUMNS = [
    "topology",
    "strategy",
    "dispatcher",
    "num_experts",
    "top_k",
    "group_limit",
    "max_vio",
    "nodes_per_token",
    "devices_per_token",
    "ib_bytes_per_token",
    "nvlink_bytes_per_token",
    "a2a_time_modeled_us",
]


def write_replay(rows: list[dict[str, Any]], out: Path, header: str = "") -> None:
    """`out` (Parquet, all columns) and its Markdown twin `out.with_suffix(".md")`."""
    write_parquet(out, pa.Table.from_pylist(rows))
    write_text(out.with_suffix(".md"), header + records_table(rows, REPLAY_COLUMNS) + "\n")


def comm_replay(
    output: Annotated[Path, typer.Option(help="Parquet file (a Markdown twin is written beside)")],
    nodes: Annotated[int, typer.Option(help="nodes")] = 8,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node")] = 8,
    experts: Annotated[int, typer.Option(help="routed experts E")] = 256,
    top_k: Annotated[int, typer.Option(help="experts per token K")] = 8,
    group_limit: Annotated[int, typer.Option(help="M of the limited strategies")] = 4,
    strategies: Annotated[str, typer.Option(help="comma list")] = ",".join(STRATEGIES),
    tokens_per_gpu: Annotated[int, typer.Option(help="tokens per source GPU")] = 4096,
    skew: Annotated[float, typer.Option(help="std of the per-expert logit offset")] = 0.25,
    bias_steps: Annotated[int, typer.Option(help="aux-free bias updates (node_limited)")] = 300,
    bias_rate: Annotated[float, typer.Option(help="bias update rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    hidden: Annotated[int, typer.Option(help="elements per token copy")] = 7168,
    dispatch_bytes: DispatchBytes = None,
    combine_bytes: CombineBytes = None,
    nvlink_gbps: NvlinkGbps = None,
    ib_gbps: IbGbps = None,
    threads: Threads = None,
) -> None:
    """Replay synthetic routing strategies (uniform, unrestricted, device- and node-limited)
    onto a topology and write one row per (strategy, dispatcher)."""
    try:
        settings = accounting(None, hidden=hidden, dispatch_bytes=dispatch_bytes,
                              combine_bytes=combine_bytes, nvlink_gbps=nvlink_gbps,
                              ib_gbps=ib_gbps)
        check_writable_dir(output.parent, "--output")
        topo = Topology.build(experts, nodes, gpus_per_node, **settings.model_dump())
        rows = replay_synthetic(
            topo,
            tuple(s.strip() for s in strategies.split(",")),
            tokens_per_gpu=tokens_per_gpu,
            top_k=top_k,
            group_limit=group_limit,
            skew=skew,
            bias_steps=bias_steps,
            bias_rate=bias_rate,
            seed=seed,
            threads=threads,
        )
        write_replay(rows, output)
    except (ValueError, OSError) as err:
        raise _fail("comm-replay", err) from None
    typer.echo(records_table(rows, REPLAY_COLUMNS))


Redundant = Annotated[
    str | None, typer.Option(help="comma list of redundant experts R (default: 0 and one per GPU)")
]


def _redundant(text: str | None) -> tuple[int, ...] | None:
    """--redundant "0,8" as (0, 8); ValueError naming the option unless integers >= 0."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = (-1,)
    if any(v < 0 for v in values):
        raise ValueError(f"--redundant={text!r} is invalid; allowed: a comma list of integers >= 0")
    return values


def _write_placement(rows: list[dict[str, Any]], out: Path, header: str) -> str:
    """`out` (summary Parquet), its `.md` twin, `<stem>.layers.parquet` (every fitted layer)
    and the figure `<stem>.png` / `.svg`; returns the Markdown."""
    from moebench.comm.placement_study import figure, markdown, summary

    table = summary(rows)
    text = markdown(table, header)
    write_parquet(out.with_suffix(".layers.parquet"), pa.Table.from_pylist(rows))
    write_parquet(out, pa.Table.from_pandas(table, preserve_index=False))
    write_text(out.with_suffix(".md"), text)
    figure(table, out.with_suffix(""))
    return text


def placement(
    runs: Annotated[Path, typer.Option(help="a study's run folder (<dataset>/<strategy>/seed~n)")],
    output: Annotated[
        Path, typer.Option(help="summary Parquet; .md, .layers.parquet, .png, .svg beside")
    ],
    study: Study = None,
    redundant: Redundant = None,
    hidden: Hidden = None,
    dispatch_bytes: DispatchBytes = None,
    combine_bytes: CombineBytes = None,
    nvlink_gbps: NvlinkGbps = None,
    ib_gbps: IbGbps = None,
) -> None:
    """Fit every placement rule (contiguous, EPLB, search) on the first half of each run's
    routing trace and judge it on the second: busiest/mean GPU load, nodes, IB / NVLink
    bytes per token, modeled all-to-all time, per strategy, rule and R."""
    from moebench.comm.placement_study import trace_rows

    try:
        settings = accounting(load_study(study) if study is not None else None, hidden=hidden,
                              dispatch_bytes=dispatch_bytes, combine_bytes=combine_bytes,
                              nvlink_gbps=nvlink_gbps, ib_gbps=ib_gbps)
        check_writable_dir(output.parent, "--output")
        kwargs = settings.model_dump(exclude_none=True)  # hidden unset: each trace's d_model
        rows = trace_rows(runs, _redundant(redundant), **kwargs)
        text = _write_placement(
            rows, output, f"Placement judged on held-out trace tokens of {runs}.\n\n"
        )
    except (ValueError, OSError) as err:
        raise _fail("placement", err) from None
    typer.echo(text)


def placement_replay(
    output: Annotated[
        Path, typer.Option(help="summary Parquet; .md, .layers.parquet, .png, .svg beside")
    ],
    nodes: Annotated[int, typer.Option(help="nodes")] = 8,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node")] = 8,
    experts: Annotated[int, typer.Option(help="routed experts E")] = 256,
    top_k: Annotated[int, typer.Option(help="experts per token K")] = 8,
    group_limit: Annotated[int, typer.Option(help="M nodes of node-limited routing")] = 4,
    redundant: Annotated[str, typer.Option(help="comma list of redundant experts R")] = "0,32",
    seeds: Annotated[str, typer.Option(help="comma list of seeds")] = "0,1,2",
    tokens_per_gpu: Annotated[int, typer.Option(help="tokens per source GPU")] = 1024,
    skew: Annotated[float, typer.Option(help="std of the per-expert logit offset")] = 0.25,
    bias_steps: Annotated[int, typer.Option(help="aux-free bias updates")] = 300,
    bias_rate: Annotated[float, typer.Option(help="bias update rate")] = 1e-3,
    hidden: Annotated[int, typer.Option(help="elements per token copy")] = 7168,
) -> None:
    """Placement rules fitted and judged on synthetic routing at cluster scale (default V3):
    uniform (the noise floor), skewed unrestricted, skewed node-limited without and with
    the aux-free bias."""
    from moebench.comm.placement_study import synthetic_rows

    try:
        check_writable_dir(output.parent, "--output")
        try:
            seed_list = tuple(int(s) for s in seeds.split(","))
        except ValueError:
            raise ValueError(
                f"--seeds={seeds!r} is invalid; allowed: a comma list of integers"
            ) from None
        topo = Topology.build(experts, nodes, gpus_per_node, hidden=hidden)
        rows = synthetic_rows(
            topo,
            _redundant(redundant),
            seed_list,
            tokens_per_gpu,
            top_k,
            group_limit,
            skew,
            bias_steps,
            bias_rate,
        )
        text = _write_placement(
            rows,
            output,
            f"Placement judged on held-out synthetic tokens, {topo.name}, E={experts}, "
            f"k={top_k}, skew={skew}, {tokens_per_gpu} tokens per GPU (half fit, half judged).\n\n",
        )
    except (ValueError, OSError) as err:
        raise _fail("placement-replay", err) from None
    typer.echo(text)
