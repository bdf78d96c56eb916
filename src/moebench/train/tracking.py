"""MLflow mirror of a training run; the files in the run directory stay the source of truth.

With `tracking.uri` set, a run is named `<strategy>/seed~<n> (<dataset>)` and logs its
flattened resolved config as params (the seed among them), its source tags (git commit,
entry point), the prepared data directory as a dataset input, system metrics
(`system/*`), every logged step's metrics live (the bias norm and spread per layer beside
the file records), the summary numbers no step logged, and the run files as artifacts.
`moebench aggregate` later adds the communication numbers (`comm.*`). Experiments are per
study (the pipeline resolves `tracking.experiment` to the
study's experiment and creates its parent run): the child of `tracking.parent_run_id` (tag
`mlflow.parentRunId`) goes into its parent's experiment, a run without parent into
`tracking.experiment` (created if missing). For a sqlite store a new experiment's artifacts go
next to the database (`<db dir>/mlruns/<experiment>`), not into the working directory; every
experiment is marked as model training (`EXPERIMENT_KIND`), so the UI does not open it in
its GenAI view.
A store that does not answer is a ValueError before training starts (`check_uri`). A store
that fails once training has started (deleted, read-only, garbage, a server that stops
answering) does not stop the run: the first failed call logs one warning naming the store and
the call, no further call is made, and the run directory, the source of truth, is written
as usual (exit 0); the MLflow run keeps what reached the store before.
A run trained with MLflow off is logged afterwards from its files by the same functions
(`log_run_files`, used by `moebench mlflow-import`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moebench.config import RunConfig
from moebench.io import read_jsonl

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 5.0
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag that makes the MLflow UI show runs, charts and comparison (training)
rather than traces and evaluations (its GenAI view, the default for an untagged one)."""
_BATCH = 100  # MLflow accepts at most 100 params per log_batch call
ARTIFACTS = ("config.resolved.yaml", "summary.json", "metrics.jsonl", "timing.jsonl")
"""The run files an MLflow run holds as artifacts."""
NOT_METRICS = ("kind", "load", "step")
"""Fields of a metrics.jsonl or timing.jsonl record that are no metric (per-expert loads: a
list of lists per layer, too many numbers for MLflow)."""
SUMMARY_PARAMS = ("study", "dataset", "strategy", "seed", "steps", "world_size")
"""summary.json fields that are already MLflow params or tags of the run, never metrics."""


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2, 3]} -> {"a.b": 1, "c.0": 2, "c.1": 3}; lists of lists (the
    per-expert loads) are left out: MLflow takes at most 1000 metrics per call."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            if not any(isinstance(v, list) for v in value):
                out.update({f"{name}.{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def sqlite_path(uri: str) -> Path | None:
    """Database file of a `sqlite:///path` URI (relative paths allowed; None for other
    schemes)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """`<db dir>/mlruns/<experiment>` as a file URI beside a sqlite store (MLflow's default is
    ./mlruns of whatever directory a job runs in); None (the server's default) otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return (db.parent.resolve() / "mlruns" / safe).as_uri()


def experiment_id(client: MlflowClient, name: str, location: str | None) -> str:
    """Id of experiment `name`, created at artifact root `location` if missing; either way
    marked as model training (EXPERIMENT_KIND: one made before the mark gets it now)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def check_uri(uri: str, parent_run_id: str | None = None) -> None:
    """ValueError unless the tracking store at `uri` answers, can be written (and holds
    `parent_run_id`).

    http(s): GET <uri>/health within HEALTH_TIMEOUT_S (the MLflow client itself retries for
    minutes); sqlite: the database and its folder must be writable (or creatable); then, for
    every scheme, the client must open the store (a file that is not a database fails here)
    and one `search_experiments` call must succeed."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S):
                pass
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise ValueError(f"tracking.uri={uri!r} does not answer: {err}") from None
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"tracking.uri={uri!r}: cannot create {db.parent} ({err})") from None
        for path in (db.parent, db):  # sqlite writes a journal beside the database
            if path.exists() and not os.access(path, os.W_OK):
                raise ValueError(
                    f"tracking.uri={uri!r}: {path} is read-only; allowed: a writable store, "
                    "or tracking.uri null (MLflow off)"
                )
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # any backend failure means "not usable"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"tracking.uri={uri!r} is not a usable MLflow store: {reason}") from None
    if parent_run_id is not None:
        try:
            client.get_run(parent_run_id)
        except Exception:  # MlflowException: no such run
            raise ValueError(
                f"tracking.parent_run_id={parent_run_id!r} is not a run of {uri!r}"
            ) from None


def root_cause(err: BaseException) -> str:
    """`Type: first line` of the innermost exception `err` was raised from (for a database
    error the driver's own words, e.g. "OperationalError: unable to open database file")."""
    while (inner := err.__cause__ or err.__context__) is not None:
        err = inner
    line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


@contextlib.contextmanager
def _mlflow_quiet() -> Iterator[None]:
    """MLflow's own log records muted for one call: a failing store logs its error with a
    traceback before raising it, and the Tracker says what failed instead."""
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        mlflow_logger.setLevel(level)


class Tracker:
    """One MLflow run of one training run (see the module docstring).

    `run_id` of a resumed run continues that run (its params are already logged); `commit`
    is the code that trained the run (default: this checkout's)."""

    def __init__(
        self, cfg: RunConfig, run_id: str | None = None, commit: str | None = None
    ) -> None:
        from mlflow.tracking import MlflowClient

        uri = cfg.tracking.uri
        if uri is None:
            raise ValueError("Tracker needs tracking.uri; got None")
        self.client = MlflowClient(tracking_uri=uri)
        self._monitor: Any = None
        self.run_id: str | None = None
        self.lost: str | None = None
        """What failed, once the store has failed (then nothing more is sent)."""
        self._guard("starting the MLflow run", lambda: self._start(cfg, run_id, uri, commit))

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        """Make one call to the store unless it failed before; on its first failure warn once,
        naming the store and `what`, and stop tracking (the run goes on)."""
        if self.lost is not None:
            return
        try:
            with _mlflow_quiet():
                call()
        except Exception as err:  # any backend failure: the run matters more than its mirror
            reason = root_cause(err)
            self.lost = f"{what}: {reason}"
            logger.warning(
                f"MLflow tracking store {self.client.tracking_uri!r} failed while {what} "
                f"({reason}); tracking stops here, the run continues and its run directory "
                "stays complete"
            )
            self._stop_monitor()

    def _start(self, cfg: RunConfig, run_id: str | None, uri: str, commit: str | None) -> None:
        """Continue run `run_id` if the store holds it, else create the run (in store `uri`,
        tagged with `commit`) and log its params and data input."""
        if run_id is not None and self._reopen(run_id):
            return
        parent = cfg.tracking.parent_run_id
        tags = {
            "study": cfg.study,
            "dataset": cfg.dataset,
            "strategy": cfg.strategy,
            "seed": str(cfg.seed),
        }
        if parent is not None:
            experiment = self.client.get_run(parent).info.experiment_id
            tags["mlflow.parentRunId"] = parent
        else:
            name = cfg.tracking.experiment
            experiment = experiment_id(self.client, name, default_artifact_location(uri, name))
        tags |= source_tags(commit)
        run = self.client.create_run(experiment, run_name=run_name(cfg), tags=tags)
        self.run_id = run.info.run_id
        self._log_params(flatten(cfg.model_dump(mode="json")))
        self._log_data_input(cfg)

    def _log_data_input(self, cfg: RunConfig) -> None:
        """The prepared data directory as the run's training dataset (digest: its token files);
        none when it is not on this machine (a run imported from another one)."""
        from mlflow.data.dataset_source_registry import get_registered_sources
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        folder = Path(cfg.data_dir).resolve()
        if not (folder / "manifest.json").is_file():
            logger.info(f"{folder} is not prepared here: no dataset input logged")
            return
        splits = json.loads((folder / "manifest.json").read_text())["splits"]
        digest = "".join(splits[s]["sha256"][:4] for s in ("train", "val"))
        local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
        data = MetaDataset(local(str(folder)), name=cfg.dataset, digest=digest)
        context = InputTag(MLFLOW_DATASET_CONTEXT, "training")
        inputs = [DatasetInput(data._to_mlflow_entity(), [context])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # Concurrent runs of a study insert the same dataset row: the SQL store looks it
            # up, then inserts it, so the slower one fails (UNIQUE constraint) and rolls back.
            # Once more, it finds the row; any other failure repeats and stops tracking.
            self.client.log_inputs(self.run_id, inputs)

    def start_system_metrics(self, resumed: bool) -> None:
        """Sample CPU, memory, disk, network (and GPU) into `system/*` metrics until finish."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        def start() -> None:
            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.client.tracking_uri
            )
            self._monitor.start()

        self._guard("starting its system metrics", start)

    def _stop_monitor(self) -> None:
        """Stop the system-metrics thread and send its last samples. After a store failure it
        is left to end by itself (a daemon thread, quitting on its first failed call), not
        waited for through the client's retries, and its own complaints are not repeated
        beside the one warning."""
        monitor, self._monitor = self._monitor, None
        if self.lost is not None:
            logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        elif monitor is not None:
            monitor.finish()

    def _reopen(self, run_id: str) -> bool:
        """Continue the checkpoint's run `run_id`; False if this store does not hold it (the
        checkpoint was written while logging to another store): a new run is started."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            logger.info(f"MLflow run {run_id} of the checkpoint is not in this store: new run")
            return False
        self.run_id = run_id
        return True

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "None" if v is None else str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric entries of a (flattened) record at `step`; others are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in sorted(flatten(metrics).items())
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if items:
            self._guard(f"logging the metrics of step {step}",
                        lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self._guard(f"logging artifact {Path(path).name}",
                            lambda p=path: self.client.log_artifact(self.run_id, str(p)))

    def finish(self, status: str = "FINISHED") -> None:
        """Stop the system metrics; mark the run FINISHED or FAILED."""
        self._guard("stopping its system metrics", self._stop_monitor)
        self._guard(f"marking the run {status}",
                    lambda: self.client.set_terminated(self.run_id, status=status))

def run_name(cfg: RunConfig) -> str:
    """`<strategy>/seed~<n> (<dataset>)`: the strategy first, so a shortened name keeps it."""
    return f"{cfg.strategy}/seed~{cfg.seed} ({cfg.dataset})"


def source_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's source tags of a training run: entry point and the git commit of the code
    (default: this checkout's)."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    from moebench.train.loop import git_sha

    return {MLFLOW_SOURCE_NAME: "moebench train", MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_GIT_COMMIT: commit or git_sha()}


def step_metrics(*records: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics of one step's records (a metrics.jsonl record, its timing.jsonl record)."""
    return {k: v for r in records for k, v in r.items() if k not in NOT_METRICS}


def summary_metrics(summary: Mapping[str, Any], last_eval: Mapping[str, Any]) -> dict[str, Any]:
    """The summary numbers no step logged (val_* are the last evaluation's, logged with it)."""
    return {k: v for k, v in summary.items() if k not in last_eval and k not in SUMMARY_PARAMS}


def log_run_files(tracker: Tracker, run: Path) -> None:
    """Log a finished run directory's files to `tracker`'s run as training would have: each
    metrics.jsonl record at its step (a train record with its timing.jsonl record, if any),
    the summary numbers at the last step, the files as artifacts; then finish the run."""
    records = read_jsonl(run / "metrics.jsonl")
    timing_path = run / "timing.jsonl"
    timing = {r["step"]: r for r in read_jsonl(timing_path)} if timing_path.is_file() else {}
    last_eval: dict[str, Any] = {}
    for record in records:
        extra = timing.get(record["step"], {}) if record["kind"] == "train" else {}
        tracker.log_metrics(step_metrics(record, extra), record["step"])
        if record["kind"] == "eval":
            last_eval = record
    summary = json.loads((run / "summary.json").read_text())
    tracker.log_metrics(summary_metrics(summary, last_eval), summary["steps"])
    tracker.log_artifacts(run / name for name in ARTIFACTS)
    tracker.finish()
