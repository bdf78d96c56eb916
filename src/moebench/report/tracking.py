"""MLflow for a study: the experiment and its parent run are created once, before training
jobs write to the store concurrently (several processes creating a fresh sqlite store at
once race on its schema migration); the experiment is marked as model training. Training
runs log themselves as children (`tracking.parent_run_id`, passed by the train rule), each
with the same metric keys and its strategy, dataset and seed as params, so MLflow's own
comparison (chart view, grouped by `strategy`) compares strategies; aggregation adds each
child's communication numbers (`comm.*`), logs the study's tables and figures to the parent
and closes it. Files stay the source of truth."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moebench.config import StudyConfig
from moebench.io import write_text
from moebench.train.tracking import EXPERIMENT_KIND, check_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative paths allowed), else None."""
    prefix = "sqlite:///"
    return Path(uri.removeprefix(prefix)) if uri.startswith(prefix) else None


def artifact_location(study: StudyConfig) -> str | None:
    """Artifact root of a new experiment as an absolute file URI: `tracking.artifact_location`
    if set, else `<db dir>/mlruns/<experiment>` beside a sqlite store (where the training
    runs put theirs; MLflow's default is ./mlruns of whatever directory a job runs in); a
    server keeps its own default (None)."""
    if study.tracking.artifact_location is not None:
        return Path(study.tracking.artifact_location).resolve().as_uri()
    db = _sqlite_file(study.tracking.uri or "")
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", study.experiment)
    return (db.parent.resolve() / "mlruns" / safe).as_uri()


def _client(uri: str) -> MlflowClient:
    """A client of `uri`; the sqlite file's folder is created. (mlflow is imported here, not
    at module level: it takes seconds, and most commands never need it.)"""
    from mlflow.tracking import MlflowClient

    db = _sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def init_parent(study: StudyConfig, out: Path) -> str:
    """Create (or find) the study's experiment and parent run; write the parent run id to
    `out` (plain text, read by the train rule). Idempotent: an open parent run of the study
    is reused."""
    uri = study.tracking.uri
    if uri is None:
        raise ValueError(f"study {study.study!r}: tracking.uri is null, MLflow is disabled")
    check_uri(uri)  # garbage, read-only or unreachable: a message, not a traceback
    client = _client(uri)
    exp = client.get_experiment_by_name(study.experiment)
    if exp is None:
        exp_id = client.create_experiment(
            study.experiment, artifact_location(study), tags=EXPERIMENT_KIND
        )
    else:  # made before experiments were marked: mark it now
        exp_id = exp.experiment_id
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp_id, key, value)
    found = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`moebench.study` = '{study.study}' and tags.`moebench.role` = 'parent'"
        ),
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(
            exp_id,
            run_name=study.study,
            tags={"moebench.study": study.study, "moebench.role": "parent"},
        )
        run_id = run.info.run_id
        client.log_dict(run_id, study.to_dict(), "study.json")
    write_text(out, run_id + "\n")
    return run_id


def log_study(
    uri: str,
    parent_run_id: str,
    comm: dict[tuple[str, str, int], dict[str, float]],
    artifacts: list[Path],
) -> None:
    """Log each child run's communication numbers (`comm`: by dataset, strategy and seed) as
    `comm.*` metrics, the study's tables and figures to the parent run, and finish it."""
    from mlflow.entities import Metric

    client = _client(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
    )
    for child in children:
        tags = child.data.tags
        numbers = comm.get((tags["dataset"], tags["strategy"], int(tags["seed"])), {})
        now = int(time.time() * 1000)
        metrics = [Metric(f"comm.{k}", v, now, 0) for k, v in sorted(numbers.items())]
        if metrics:
            client.log_batch(child.info.run_id, metrics=metrics)
    for path in artifacts:
        client.log_artifact(parent_run_id, str(path), artifact_path=path.parent.name)
    client.set_terminated(parent_run_id, "FINISHED")


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
