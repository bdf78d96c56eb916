"""Study files on disk: the JSON schema Snakemake validates them against, the validated copy
the rules read, and the resolved per-run configs (`moebench resolve`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from moebench.config import StudyConfig
from moebench.io import write_text, write_yaml
from moebench.report.paths import study_copy_file

SCHEMA_FILE = Path("workflow/schemas/study.schema.json")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def study_json_schema() -> dict[str, Any]:
    """JSON schema of a study file, generated from `StudyConfig` (with the `$schema` key that
    Snakemake's `validate()` requires)."""
    return {"$schema": JSON_SCHEMA_DIALECT, **StudyConfig.model_json_schema()}


def schema_text() -> str:
    """The committed form of the schema (a test compares the file with this)."""
    return json.dumps(study_json_schema(), indent=2, ensure_ascii=False) + "\n"


def write_study_copy(study: StudyConfig) -> Path:
    """Write the validated study for the rules' `moebench` calls, only when its content
    changed (so a re-parse of the Snakefile on every SLURM job leaves it alone)."""
    path = study_copy_file(study.study)
    text = yaml.safe_dump(study.to_dict(), sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)
    return path


def resolve(
    study: StudyConfig, dataset: str, strategy: str | None, seed: int | None, out: Path
) -> None:
    """Write the RunConfig of one grid point (or, without strategy and seed, the dataset's
    config that `moebench data` reads)."""
    if (strategy is None) != (seed is None):
        raise ValueError("--strategy and --seed go together (both for a run, neither for data)")
    cfg = (
        study.data_config(dataset)
        if strategy is None or seed is None
        else study.run_config(dataset, strategy, seed)
    )
    write_yaml(out, cfg.model_dump(mode="json"))
