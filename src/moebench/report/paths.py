"""Every path of a study, in one place: the Snakemake rules and the `moebench` commands both
build file names from here, so the run-directory contract (docs/run-directory.md) is spelled once.

All paths are relative to the project root (Snakemake's working directory)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path("results")
WORK = Path("work")

SEED_PREFIX = "seed~"
"""Run directories end in `seed~<n>`, Paramspace style."""

FIGURES = ("maxvio_batch", "load_heatmap", "ppl_vs_maxvio", "nodes_per_token")
"""The per-(study, dataset) figures `moebench aggregate` always draws."""
OPTIONAL_FIGURES = ("m_sweep", "domain_share", "specialisation")
"""Figures drawn when the runs have what they need: device- or node-limited strategies
(m_sweep), `load_by_domain` in summary.json (domain_share, specialisation)."""


def run_dir(study: str, dataset: str, strategy: str, seed: int | str, root: Path = RESULTS) -> Path:
    """results/runs/<study>/<dataset>/<strategy>/seed~<n>/ (train, comm and aggregate share it)."""
    return root / "runs" / study / dataset / strategy / f"{SEED_PREFIX}{seed}"


def ckpt_dir(study: str, dataset: str, strategy: str, seed: int | str) -> Path:
    """Checkpoints of one run: git-ignored, under work/ckpt with the run's sub-path."""
    return WORK / "ckpt" / study / dataset / strategy / f"{SEED_PREFIX}{seed}"


def run_config_file(study: str, dataset: str, strategy: str, seed: int | str) -> Path:
    """The resolved RunConfig that `moebench train` reads (written by `moebench resolve`)."""
    return WORK / "configs" / study / dataset / strategy / f"{SEED_PREFIX}{seed}.yaml"


def data_config_file(study: str, dataset: str) -> Path:
    """The RunConfig that `moebench data` reads for one dataset of a study."""
    return WORK / "configs" / study / dataset / "data.yaml"


def data_dir(study: str, dataset: str) -> Path:
    """Token streams of one dataset of a study (per study: studies may tokenize differently)."""
    return WORK / "data" / study / dataset


def kernels_file(study: str, root: Path = RESULTS) -> Path:
    """Router-kernel check (and GPU benchmark) of the machine that ran the study."""
    return root / "kernels" / f"{study}.parquet"


def parent_run_file(study: str, root: Path = RESULTS) -> Path:
    """The MLflow parent run id of a study (plain text; written by `moebench mlflow-init`)."""
    return root / "mlflow" / "parents" / f"{study}.txt"


def summary_file(root: Path = RESULTS) -> Path:
    """One row per run of every study under results/runs."""
    return root / "tables" / "summary.parquet"


def table_file(study: str, suffix: str, root: Path = RESULTS) -> Path:
    """Per-study table: `<study>.md` (with published numbers) or `<study>.csv`."""
    return root / "tables" / f"{study}.{suffix}"


def claims_file(study: str, root: Path = RESULTS) -> Path:
    """The published claims checked on a study (Markdown; the README shows it)."""
    return root / "tables" / f"{study}-claims.md"


def paired_file(study: str, root: Path = RESULTS) -> Path:
    """Paired differences of every strategy against the study's baseline (CSV)."""
    return root / "tables" / f"{study}-paired.csv"


def figure_file(study: str, dataset: str, name: str, root: Path = RESULTS) -> Path:
    """results/figures/<study>-<dataset>-<name>.png (an .svg beside it), `name` one of
    FIGURES or OPTIONAL_FIGURES."""
    return root / "figures" / f"{study}-{dataset}-{name}.png"


def report_file(root: Path = RESULTS) -> Path:
    """`snakemake --report` output."""
    return root / "report.html"
