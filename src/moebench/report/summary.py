"""One row per run: read `summary.json` + `comm.json` of every run directory, check the rows
against a pandera schema, and load the per-step curves of `metrics.jsonl`.

Run directories follow the contract of `paths.run_dir`; the identity columns come from
`summary.json` and must agree with the path (`paths.run_identity`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moebench.config import (
    RunConfig,
    describe_errors,
    format_validation_error,
    read_yaml_mapping,
)
from moebench.progress import progress
from moebench.report.domains import domain_loads
from moebench.report.paths import OUT, RunIdentity, run_dir, run_identity, seed_of

IDENTITY = RunIdentity._fields
SUMMARY_FIELDS = (
    "steps",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "maxvio_global",
    "maxvio_batch_mean",
    "drop_frac",
    "tokens_per_s",
    "mfu",
    "elapsed_s",
    "machine",
    "device",
    "git_sha",
    "torch_version",
)
"""Scalars copied from summary.json (written by `moebench train`)."""
COMM_FIELDS = (
    "devices_per_token",
    "nodes_per_token",
    "nvlink_bytes_per_token",
    "ib_bytes_per_token",
    "a2a_time_modeled_us",
)
"""Scalars copied from comm.json (written by `moebench comm`; dedup dispatcher)."""
COLUMNS = (*IDENTITY, *SUMMARY_FIELDS, *COMM_FIELDS)
TEXT_FIELDS = ("machine", "device", "git_sha", "torch_version")


def _nonneg(nullable: bool = False) -> pa.Column:
    return pa.Column(float, pa.Check.ge(0.0), nullable=nullable)


def _ppl_matches_loss(df: pd.DataFrame) -> pd.Series:
    """val_ppl is exp(val_loss) (both are per-token means over the validation batches)."""
    return pd.Series(np.isclose(df["val_ppl"], np.exp(df["val_loss"]), rtol=1e-3), index=df.index)


SUMMARY_SCHEMA = pa.DataFrameSchema(
    {
        "study": pa.Column(str),
        "dataset": pa.Column(str),
        "strategy": pa.Column(str),
        "seed": pa.Column(int, pa.Check.ge(0)),
        "steps": pa.Column(int, pa.Check.ge(1)),
        "val_loss": pa.Column(float, pa.Check.gt(0.0)),
        "val_ppl": pa.Column(float, pa.Check.ge(1.0)),
        "val_bpb": pa.Column(float, pa.Check.gt(0.0), nullable=True),
        # null for a dense model (no MoE layer: no load, no routing, no all-to-all)
        "maxvio_global": _nonneg(nullable=True),
        "maxvio_batch_mean": _nonneg(nullable=True),
        "drop_frac": pa.Column(float, pa.Check.in_range(0.0, 1.0), nullable=True),
        "tokens_per_s": pa.Column(float, pa.Check.gt(0.0)),
        "mfu": _nonneg(nullable=True),
        "elapsed_s": _nonneg(),
        "machine": pa.Column(str),
        "device": pa.Column(str),
        "git_sha": pa.Column(str),
        "torch_version": pa.Column(str),
        "devices_per_token": pa.Column(float, pa.Check.ge(1.0), nullable=True),
        "nodes_per_token": pa.Column(float, pa.Check.ge(1.0), nullable=True),
        "nvlink_bytes_per_token": _nonneg(nullable=True),
        "ib_bytes_per_token": _nonneg(nullable=True),
        "a2a_time_modeled_us": _nonneg(nullable=True),
    },
    checks=[
        pa.Check(_ppl_matches_loss, name="val_ppl == exp(val_loss)"),
        pa.Check(
            lambda df: (
                (df["nodes_per_token"] <= df["devices_per_token"] + 1e-9)
                | df["nodes_per_token"].isna()
            ),
            name="nodes_per_token <= devices_per_token",
        ),
    ],
    strict=True,
    ordered=True,
    unique=list(IDENTITY),
    coerce=False,
    name="summary",
)
"""summary.parquet: one row per run, validated before it is written."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


Int64 = Annotated[int, Field(ge=0, lt=1 << 63)]
"""A count or id that a Parquet int64 column holds (a larger one is refused by name)."""


class _Record(BaseModel):
    """A record a run directory holds: the fields aggregation reads, typed (others pass)."""

    model_config = ConfigDict(extra="allow", strict=True)


class SummaryRecord(_Record):
    """summary.json, as aggregation reads it (docs/run-directory.md)."""

    study: str
    dataset: str
    strategy: str
    seed: Int64
    steps: Int64
    val_loss: float
    val_ppl: float
    val_bpb: float | None
    maxvio_global: float | None
    maxvio_batch_mean: float | None
    drop_frac: float | None
    tokens_per_s: float
    mfu: float | None
    elapsed_s: float
    machine: str
    device: str
    git_sha: str
    torch_version: str
    load_global: list[list[float]]
    load_by_domain: dict[str, list[list[float]]] = {}


class CommRecord(_Record):
    """comm.json's per-token means (dedup dispatcher), as aggregation reads them."""

    devices_per_token: float | None
    nodes_per_token: float | None
    nvlink_bytes_per_token: float | None
    ib_bytes_per_token: float | None
    a2a_time_modeled_us: float | None


class TrainRecord(_Record):
    """A `{"kind": "train"}` line of metrics.jsonl (eval lines are not read here)."""

    kind: Literal["train"]
    step: Int64
    maxvio_batch: float | None


REQUIRED_FILES = ("config.resolved.yaml", "metrics.jsonl", "summary.json", "comm.json")
"""The files of a run directory that aggregation reads: each is checked when read."""


def _typed(model: type[_Record], obj: Any, where: str) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        problems = describe_errors(err, model)
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{where}: " + "; ".join(problems[:3]) + more) from None


def check_run(run: Path) -> None:
    """ValueError naming the run directory, the file and the field unless every file
    aggregation reads is there and holds typed records (REQUIRED_FILES)."""
    missing = [name for name in REQUIRED_FILES if not (run / name).is_file()]
    if missing:
        raise ValueError(
            f"run {run} lacks {', '.join(missing)}; a complete run directory holds "
            f"{', '.join(REQUIRED_FILES)}: rerun its train and comm jobs"
        )
    read_config(run)
    _train_records(run)
    run_row(run)


def read_config(run: Path) -> RunConfig:
    """The run's config.resolved.yaml, validated as a RunConfig."""
    path = run / "config.resolved.yaml"
    raw = read_yaml_mapping(path, "run config")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, RunConfig, str(path))) from None


def _train_records(run: Path) -> list[TrainRecord]:
    """The training records of metrics.jsonl, typed; ValueError naming the line if bad."""
    path, records = run / "metrics.jsonl", []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
            if isinstance(obj, dict) and obj.get("kind") == "eval":
                continue
            records.append(_typed(TrainRecord, obj, f"{path}, line {number}"))
    return records


def find_runs(root: Path = OUT, studies: list[str] | None = None) -> list[Path]:
    """Complete run directories (summary.json and comm.json present) of `studies` (default:
    every study under `root`), sorted by path."""
    names = ["*"] if studies is None else studies
    runs = sorted(r for s in names for r in root.glob(str(run_dir(s, "*", "*", "*", Path()))))
    return [
        r
        for r in runs
        if seed_of(r.name) is not None
        and (r / "summary.json").is_file()
        and (r / "comm.json").is_file()
    ]


def run_row(run: Path) -> dict[str, Any]:
    """The summary row of one run directory; ValueError if a field is missing or mislabelled."""
    summary = _typed(SummaryRecord, _read_json(run / "summary.json"), f"{run / 'summary.json'}")
    comm = _typed(CommRecord, _read_json(run / "comm.json"), f"{run / 'comm.json'}")
    path_identity = run_identity(run)._asdict()
    row = {f: getattr(summary, f) for f in (*IDENTITY, *SUMMARY_FIELDS)}
    row |= {f: getattr(comm, f) for f in COMM_FIELDS}
    for key, expected in path_identity.items():
        if row[key] != expected:
            raise ValueError(
                f"{run / 'summary.json'}: {key}={row[key]!r} disagrees with its directory "
                f"(expected {expected!r})"
            )
    return row


def collect(runs: list[Path]) -> pd.DataFrame:
    """Validated summary frame of `runs`: columns COLUMNS, rows sorted by identity."""
    if not runs:
        raise ValueError("no complete run directories (summary.json + comm.json) found")
    with progress("checking runs", "run", runs) as bar:
        for run in bar:  # every file read below, typed, before anything is computed
            check_run(run)
    df = pd.DataFrame([run_row(r) for r in runs], columns=list(COLUMNS))
    ints = ["seed", "steps"]
    floats = [c for c in COLUMNS if c not in (*IDENTITY, *ints, *TEXT_FIELDS)]
    df[floats] = df[floats].astype("float64")
    df[ints] = df[ints].astype("int64")
    df = df.sort_values(list(IDENTITY), kind="stable").reset_index(drop=True)
    return validate(df)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check `df` against SUMMARY_SCHEMA; ValueError listing every failed check."""
    try:
        return SUMMARY_SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases[["column", "check", "failure_case", "index"]]
        raise ValueError(f"summary table fails its schema:\n{cases.to_string()}") from None


def load_curves(runs: list[Path]) -> pd.DataFrame:
    """Training records of metrics.jsonl: study, dataset, strategy, seed, step, maxvio_batch."""
    frames = []
    for run in runs:
        ident = run_row(run)
        records = _train_records(run)
        steps, vio = [r.step for r in records], [r.maxvio_batch for r in records]
        curve = {"step": steps, "maxvio_batch": vio}
        frames.append(pd.DataFrame({k: ident[k] for k in IDENTITY} | curve))
    return pd.concat(frames, ignore_index=True)


def load_matrices(runs: list[Path]) -> dict[tuple[str, str, str, int], np.ndarray]:
    """`load_global` [L][E] (validation expert loads) of each run, keyed by identity."""
    out = {}
    for run in runs:
        summary = _read_json(run / "summary.json")
        key = tuple(summary[k] for k in IDENTITY)
        out[key] = np.asarray(summary["load_global"], dtype=np.float64)
    return out


def balance_knobs(cfg: dict[str, Any]) -> dict[str, float]:
    """The balance strengths a run swept: every non-zero `balance.*_alpha` and, with the bias
    on, `balance.bias.rate` (read from config.resolved.yaml)."""
    balance = cfg["balance"]
    knobs = {k: float(v) for k, v in sorted(balance.items()) if k.endswith("_alpha") and v}
    if balance["bias"]["enabled"]:
        knobs["bias.rate"] = float(balance["bias"]["rate"])
    return knobs


def load_settings(runs: list[Path]) -> pd.DataFrame:
    """Per run: identity, the gate, the routing limit and M (NaN: no limit), and the balance
    knobs, as `knobs` ("global_alpha=0.001"), `knob_value` (the first knob's value, 0
    without) and `family` (gate, limit and knob names: runs of one family differ only in
    knob values)."""
    rows = []
    for run in runs:
        config = read_config(run)
        cfg = config.model_dump(mode="json")
        knobs = balance_knobs(cfg)
        router = cfg["router"]
        groups = config.num_groups  # an unset M is every group
        rows.append(
            {k: cfg[k] for k in IDENTITY}
            | {
                "score_fn": router["score_fn"],
                "limit": router["limit"],
                "group_limit": int(router["group_limit"] or groups),
                "knobs": ", ".join(f"{k}={v:g}" for k, v in knobs.items()),
                "knob_value": next(iter(knobs.values()), 0.0),
                "family": " ".join([router["score_fn"], router["limit"], *knobs]),
            }
        )
    return pd.DataFrame(rows)


def load_domain_loads(
    runs: list[Path],
) -> dict[tuple[str, str, str, int], tuple[list[str], np.ndarray]]:
    """Domains and `load_DLE` (summary.json's `load_by_domain`: {domain: [[load per expert]
    per layer]}) of each run that records loads (a dense model's lists are empty), keyed by
    identity; ValueError naming the run if malformed."""
    out = {}
    for run in runs:
        summary = _read_json(run / "summary.json")
        if any(summary.get("load_by_domain", {}).values()):  # a dense model: no MoE layer
            where = f"{run / 'summary.json'}: load_by_domain"
            out[tuple(summary[k] for k in IDENTITY)] = domain_loads(
                summary["load_by_domain"], where
            )
    return out
