"""One row per run: read `summary.json` + `comm.json` of every run directory, check the rows
against a pandera schema, and load the per-step curves of `metrics.jsonl`.

Run directories follow the contract `<root>/runs/<study>/<dataset>/<strategy>/seed~<n>/`;
the identity columns come from `summary.json` and must agree with the path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
import yaml

from moebench.config import RunConfig
from moebench.report.domains import domain_loads
from moebench.report.paths import OUT, SEED_PREFIX

IDENTITY = ("study", "dataset", "strategy", "seed")
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


def find_runs(root: Path = OUT, studies: list[str] | None = None) -> list[Path]:
    """Complete run directories (summary.json and comm.json present), sorted by path."""
    runs = sorted((root / "runs").glob(f"*/*/*/{SEED_PREFIX}*"))
    return [
        r
        for r in runs
        if (studies is None or r.parts[-4] in studies)
        and (r / "summary.json").is_file()
        and (r / "comm.json").is_file()
    ]


def run_row(run: Path) -> dict[str, Any]:
    """The summary row of one run directory; ValueError if a field is missing or mislabelled."""
    summary, comm = _read_json(run / "summary.json"), _read_json(run / "comm.json")
    path_identity = {
        "study": run.parts[-4],
        "dataset": run.parts[-3],
        "strategy": run.parts[-2],
        "seed": int(run.name.removeprefix(SEED_PREFIX)),
    }
    row: dict[str, Any] = {}
    for source, fields, name in (
        (summary, (*IDENTITY, *SUMMARY_FIELDS), "summary.json"),
        (comm, COMM_FIELDS, "comm.json"),
    ):
        missing = [f for f in fields if f not in source]
        if missing:
            raise ValueError(f"{run / name} lacks the fields {missing}")
        row |= {f: source[f] for f in fields}
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
        steps, vio = [], []
        with (run / "metrics.jsonl").open() as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "train":
                    steps.append(rec["step"])
                    vio.append(rec["maxvio_batch"])
        frames.append(
            pd.DataFrame({k: ident[k] for k in IDENTITY} | {"step": steps, "maxvio_batch": vio})
        )
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
        cfg = yaml.safe_load((run / "config.resolved.yaml").read_text())
        knobs = balance_knobs(cfg)
        router = cfg["router"]
        groups = RunConfig.model_validate(cfg).num_groups  # an unset M is every group
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
