"""MLflow for a study: the experiment and its parent run are created once, before training
jobs write to the store concurrently (several processes creating a fresh sqlite store at
once race on its schema migration); the experiment is marked as model training. Training
runs log themselves as children (`tracking.parent_run_id`, passed by the train rule), each
with the same metric keys and its strategy, dataset and seed as params, so MLflow's own
comparison (chart view, grouped by `strategy`) compares strategies; aggregation adds each
child's communication numbers (`comm.*`), logs the study's tables and figures to the parent
and closes it. `moebench mlflow-import` logs runs trained with MLflow off the same way, from
their files (`import_runs`). Files stay the source of truth."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moebench.config import StudyConfig
from moebench.config.loading import load_run_config
from moebench.config.run import TrackingConfig
from moebench.io import write_text
from moebench.report import paths
from moebench.train.tracking import (
    Tracker,
    check_uri,
    default_artifact_location,
    experiment_id,
    log_run_files,
    sqlite_path,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


def artifact_location(study: StudyConfig) -> str | None:
    """Artifact root of a new experiment as an absolute file URI: `tracking.artifact_location`
    if set, else beside a sqlite store where the training runs put theirs."""
    if study.tracking.artifact_location is not None:
        return Path(study.tracking.artifact_location).resolve().as_uri()
    return default_artifact_location(study.tracking.uri or "", study.experiment)


def _client(uri: str) -> MlflowClient:
    """A client of `uri`; the sqlite file's folder is created. (mlflow is imported here, not
    at module level: it takes seconds, and most commands never need it.)"""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def tracking_uri(study: StudyConfig) -> str:
    """The study's tracking URI; ValueError if it is null (MLflow off)."""
    if study.tracking.uri is None:
        raise ValueError(f"study {study.study!r}: tracking.uri is null, MLflow is disabled; "
                         "allowed: a sqlite:/// or http(s):// store")
    return study.tracking.uri


def _checked_uri(study: StudyConfig) -> str:
    """The study's tracking URI; ValueError if MLflow is off or the store is unusable."""
    uri = tracking_uri(study)
    check_uri(uri)  # garbage, read-only or unreachable: a message, not a traceback
    return uri


def parent_run(study: StudyConfig) -> str:
    """Id of the study's parent run, created (with the experiment) if the store has none."""
    client = _client(_checked_uri(study))
    exp_id = experiment_id(client, study.experiment, artifact_location(study))
    found = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`moebench.study` = '{study.study}' and tags.`moebench.role` = 'parent'"
        ),
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {"moebench.study": study.study, "moebench.role": "parent"}
    run = client.create_run(exp_id, run_name=study.study, tags=tags)
    client.log_dict(run.info.run_id, study.to_dict(), "study.json")
    return run.info.run_id


def init_parent(study: StudyConfig, out: Path) -> str:
    """Create (or find) the study's experiment and parent run; write the parent run id to
    `out` (plain text, read by the train rule). Idempotent: the study's parent run is reused."""
    run_id = parent_run(study)
    write_text(out, run_id + "\n")
    return run_id


COMM_METRICS = (
    "devices_per_token",
    "nodes_per_token",
    "nvlink_bytes_per_token",
    "ib_bytes_per_token",
    "a2a_time_modeled_us",
)
"""The communication numbers of a run's comm.json that MLflow gets (dedup dispatcher)."""
PARENT_SUFFIXES = (".md", ".csv", ".png", ".svg", ".html")
"""The study outputs its parent run holds: tables and figures."""


def comm_metrics(run: Path) -> dict[str, float]:
    """The COMM_METRICS of run directory `run`'s comm.json (those it has)."""
    numbers = json.loads((run / "comm.json").read_text())
    return {k: numbers[k] for k in COMM_METRICS if numbers.get(k) is not None}


def log_comm(client: MlflowClient, run_id: str, numbers: dict[str, float]) -> None:
    """Log a run's communication numbers as `comm.*` metrics at step 0."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(f"comm.{k}", v, now, 0) for k, v in sorted(numbers.items())]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def finish_parent(client: MlflowClient, parent_run_id: str, artifacts: list[Path]) -> None:
    """Log the study's tables and figures (by folder: tables/, figures/) to its parent run and
    mark it finished."""
    for path in artifacts:
        client.log_artifact(parent_run_id, str(path), artifact_path=path.parent.name)
    client.set_terminated(parent_run_id, "FINISHED")


def log_study(
    uri: str,
    parent_run_id: str,
    comm: dict[tuple[str, str, int], dict[str, float]],
    artifacts: list[Path],
) -> None:
    """Log each child run's communication numbers (`comm`: by dataset, strategy and seed) as
    `comm.*` metrics, the study's tables and figures to the parent run, and finish it."""
    client = _client(uri)
    for child in _children(client, parent_run_id):
        tags = child.data.tags
        log_comm(client, child.info.run_id,
                 comm.get((tags["dataset"], tags["strategy"], int(tags["seed"])), {}))
    finish_parent(client, parent_run_id, artifacts)


def _children(client: MlflowClient, parent_run_id: str, where: str = "") -> list[Run]:
    """The (active) child runs of `parent_run_id`, narrowed by the filter clause `where`."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + (f" and {where}" if where else "")
    return client.search_runs([experiment], query, max_results=10000)


def study_outputs(study: StudyConfig, root: Path) -> list[Path]:
    """The study's tables and figures that `aggregate` wrote under `root` (those present)."""
    tables = [paths.table_file(study.study, s, root) for s in ("md", "csv", "html")]
    tables += [paths.paired_file(study.study, root), paths.claims_file(study.study, root)]
    figures = [paths.figure_file(study.study, d, name, root).with_suffix(suffix)
               for d in study.datasets for name in paths.FIGURES + paths.OPTIONAL_FIGURES
               for suffix in (".png", ".svg")]
    return [p for p in tables + figures if p.is_file() and p.suffix in PARENT_SUFFIXES]


def import_runs(study: StudyConfig, runs: list[Path], root: Path) -> dict[Path, str]:
    """Log finished run directories of `study` (trained with MLflow off, e.g. on another
    machine) into its store as live training and `aggregate` would have: the parent run, one
    child per run (params, tags, step metrics, summary, `comm.*`, files), the study's tables
    and figures under `root`. Idempotent: a run whose FINISHED child (same dataset, strategy,
    seed) exists is skipped; an unfinished one (an import cut short) is deleted and replaced.
    Returns what happened to each run: "imported", "replaced" or "skipped"."""
    uri = _checked_uri(study)
    configs = {run: load_run_config(run / "config.resolved.yaml") for run in runs}
    parent = parent_run(study)
    client = _client(uri)
    done: dict[Path, str] = {}
    for run, cfg in configs.items():
        found = _children(client, parent, " and ".join(
            f"tags.`{k}` = '{v}'" for k, v in
            (("dataset", cfg.dataset), ("strategy", cfg.strategy), ("seed", cfg.seed))))
        if any(r.info.status == "FINISHED" for r in found):
            done[run] = "skipped"
            continue
        for stale in found:
            client.delete_run(stale.info.run_id)
        cfg = cfg.model_copy(update={"tracking": TrackingConfig(
            uri=uri, experiment=study.experiment, parent_run_id=parent)})
        commit = json.loads((run / "summary.json").read_text()).get("git_sha")
        tracker = Tracker(cfg, commit=commit)
        try:
            log_run_files(tracker, run)
        except BaseException:
            tracker.finish("FAILED")
            raise
        log_comm(client, tracker.run_id, comm_metrics(run))
        done[run] = "replaced" if found else "imported"
    finish_parent(client, parent, study_outputs(study, root))
    return done


def study_runs(uri: str, experiment: str) -> list[dict[str, str]]:
    """Run id, name, parent id and status of every run of `experiment` (parent included)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name or "",
            "parent": r.data.tags.get("mlflow.parentRunId", ""),
            "status": r.info.status,
        }
        for r in client.search_runs([exp.experiment_id], max_results=10000)
    ]
