"""Every path of a study, in one place: the Snakemake rules and the `moebench` commands both
build file names from here, so the run-directory contract (docs/run-directory.md) is spelled once.

A run writes everything under one output root, `$MOEBENCH_OUT` (default `work/`, git-ignored):
runs, checkpoints, tables, figures, logs and the MLflow store. The committed reference of a
study (`results/reference/<study>/`) has the same layout, so one function names a file in
either. Relative paths are relative to the project root (Snakemake's working directory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

OUT = Path(os.environ.get("MOEBENCH_OUT") or "work")
"""The output root of this process: `$MOEBENCH_OUT`, else `work/`."""

REFERENCE = Path("results/reference")
"""Committed, read-only reference outputs, one folder per study."""

SEED_PREFIX = "seed~"
"""Run directories end in `seed~<n>`, Paramspace style."""

FIGURES = ("maxvio_batch", "load_heatmap", "ppl_vs_maxvio", "nodes_per_token")
"""The per-(study, dataset) figures `moebench aggregate` always draws."""
OPTIONAL_FIGURES = ("m_sweep", "domain_share", "specialisation")
"""Figures drawn when the runs have what they need: device- or node-limited strategies
(m_sweep), `load_by_domain` in summary.json (domain_share, specialisation)."""

RUN_FILES = (
    "config.resolved.yaml",
    "metrics.jsonl",
    "timing.jsonl",
    "summary.json",
    "routing_trace.parquet",
    "comm.parquet",
    "comm.json",
)
"""The files of a finished run directory (`moebench train`, then `moebench comm`)."""


def reference_dir(study: str) -> Path:
    """results/reference/<study>/: the committed outputs `moebench check` compares with."""
    return REFERENCE / study


class RunIdentity(NamedTuple):
    """Which run a run directory holds: its place in the study grid."""

    study: str
    dataset: str
    strategy: str
    seed: int


def run_dir(study: str, dataset: str, strategy: str, seed: int | str, root: Path = OUT) -> Path:
    """<root>/runs/<study>/<dataset>/<strategy>/seed~<n>/ (train, comm and aggregate share it);
    `"*"` for a part gives the glob pattern of every run directory with the others."""
    return root / "runs" / study / dataset / strategy / f"{SEED_PREFIX}{seed}"


def seed_of(name: str) -> int | None:
    """n of a run directory's name `seed~<n>`; None for any other name."""
    digits = name.removeprefix(SEED_PREFIX)
    return int(digits) if name.startswith(SEED_PREFIX) and digits.isdecimal() else None


def run_identity(run: Path) -> RunIdentity:
    """The inverse of `run_dir`: the identity of <root>/runs/<study>/<dataset>/<strategy>/
    seed~<n>; ValueError naming the path otherwise."""
    parts = run.parts[-5:]
    seed = seed_of(run.name)
    if len(parts) < 5 or parts[0] != "runs" or seed is None:
        raise ValueError(
            f"{run} is not a run directory; allowed: <root>/runs/<study>/<dataset>/<strategy>/"
            f"{SEED_PREFIX}<n>"
        )
    return RunIdentity(parts[1], parts[2], parts[3], seed)


def ckpt_dir(study: str, dataset: str, strategy: str, seed: int | str, root: Path = OUT) -> Path:
    """Checkpoints of one run, outside its run directory (a reference holds none)."""
    return root / "ckpt" / study / dataset / strategy / f"{SEED_PREFIX}{seed}"


def run_config_file(study: str, dataset: str, strategy: str, seed: int | str) -> Path:
    """The resolved RunConfig that `moebench train` reads (written by `moebench resolve`)."""
    return OUT / "configs" / study / dataset / strategy / f"{SEED_PREFIX}{seed}.yaml"


def data_config_file(study: str, dataset: str) -> Path:
    """The RunConfig that `moebench data` reads for one dataset of a study."""
    return OUT / "configs" / study / dataset / "data.yaml"


def study_copy_file(study: str) -> Path:
    """Where the workflow keeps the validated study (configfile + --config overrides)."""
    return OUT / "studies" / f"{study}.yaml"


def conda_env_file() -> Path:
    """Where the workflow keeps the rules' conda environment (environment.yml, made absolute)."""
    return OUT / "conda" / "environment.yaml"


def data_dir(study: str, dataset: str) -> Path:
    """Token streams of one dataset of a study (per study: studies may tokenize differently)."""
    return OUT / "data" / study / dataset


def log_file(study: str, step: str) -> Path:
    """Log of one job; `step` is the rule name, with the job's sub-path for per-run jobs."""
    return OUT / "logs" / study / f"{step}.log"


def benchmark_file(study: str, step: str) -> Path:
    """Snakemake's resource benchmark of one job (same `step` as log_file)."""
    return OUT / "benchmarks" / study / f"{step}.tsv"


def kernels_file(study: str, root: Path = OUT) -> Path:
    """Router-kernel check (and GPU benchmark) of the machine that ran the study."""
    return root / "kernels" / f"{study}.parquet"


def parent_run_file(study: str, root: Path = OUT) -> Path:
    """The MLflow parent run id of a study (plain text; written by `moebench mlflow-init`)."""
    return root / "mlflow" / "parents" / f"{study}.txt"


def summary_file(study: str, root: Path = OUT) -> Path:
    """One row per run of the study: <root>/tables/<study>.parquet."""
    return table_file(study, "parquet", root)


def table_file(study: str, suffix: str, root: Path = OUT) -> Path:
    """Per-study table: `<study>.md` (with published numbers), `.csv` or `.parquet`."""
    return root / "tables" / f"{study}.{suffix}"


def claims_file(study: str, root: Path = OUT) -> Path:
    """The published claims checked on a study (Markdown; the README shows it)."""
    return root / "tables" / f"{study}-claims.md"


def paired_file(study: str, root: Path = OUT) -> Path:
    """Paired differences of every strategy against the study's baseline (CSV)."""
    return root / "tables" / f"{study}-paired.csv"


def figure_file(study: str, dataset: str, name: str, root: Path = OUT) -> Path:
    """<root>/figures/<study>-<dataset>-<name>.png (an .svg beside it), `name` one of
    FIGURES or OPTIONAL_FIGURES."""
    return root / "figures" / f"{study}-{dataset}-{name}.png"


def placement_file(study: str, root: Path = OUT) -> Path:
    """The expert-placement table of a study's runs (`moebench placement`; .md, .layers.parquet,
    .png and .svg beside it)."""
    return root / "placement" / f"{study}.parquet"


def machine_file(study: str, root: Path = OUT) -> Path:
    """The machine signature (CPU, flags, versions, threads, settings) of a study's runs."""
    return root / "tables" / f"{study}.machine.json"


def report_file(study: str, root: Path = OUT) -> Path:
    """`snakemake --report` output."""
    return root / f"{study}-report.html"
