"""Pipeline commands: `moebench new-study`, `resolve`, `fits`, `schema`, `mlflow-init`,
`aggregate`, `where`, `check`, `reference`.
Heavy imports (mlflow, matplotlib, pandas) happen inside the commands that need them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from moebench.config import StudyConfig, load_study
from moebench.report import paths
from moebench.report.study import SCHEMA_FILE

StudyFile = Annotated[Path, typer.Option("--study", help="study YAML (configs/*.yaml)")]
ResultsDir = Annotated[
    Path,
    typer.Option("--results", help="output root holding runs/ (default $MOEBENCH_OUT or work)"),
]
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input (ValueError) or an unusable file system (OSError: a full disk, a missing
    permission) ends the command with its message and exit code 2."""
    try:
        yield
    except (ValueError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def resolve(
    study: StudyFile,
    dataset: Annotated[str, typer.Option(help="dataset name of the study")],
    output: Annotated[Path, typer.Option(help="resolved RunConfig YAML to write")],
    strategy: Annotated[
        str | None, typer.Option(help="strategy name (omit for the data config)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed (omit for the data config)")] = None,
) -> None:
    """Write the resolved RunConfig of one grid point (base <- strategy override)."""
    from moebench.report.study import resolve as resolve_to

    with _user_errors():
        resolve_to(load_study(study), dataset, strategy, seed, output)


def fits(study: StudyFile) -> None:
    """Check that every run of the study fits the memory of the device it would train on
    here (a lower bound: moebench.train.memory); exit 2 listing the runs that cannot."""
    from moebench.train.memory import study_misfits

    with _user_errors():
        cfg = load_study(study)
        misfits = study_misfits(cfg)
        if misfits:
            raise ValueError(
                f"{len(misfits)} of the (dataset, strategy) pairs of study {cfg.study!r} cannot "
                "train on this machine:\n  " + "\n  ".join(misfits)
            )
    typer.echo(f"every run of study {cfg.study!r} fits this machine (lower bound)")


def new_study(
    name: Annotated[str, typer.Option(help="the study's name: its runs go to <root>/runs/<name>")],
    output: Annotated[Path, typer.Option(help="study YAML to write (a new file)")],
    text: Annotated[
        str | None, typer.Option(help="a local UTF-8 text file to train on (data.source: file)")
    ] = None,
    hf: Annotated[
        str | None, typer.Option(help="a Hugging Face dataset name instead (data.source: hf)")
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary (>= 260)")] = 512,
    template: Annotated[
        Path, typer.Option(help="study whose model, strategies and seeds are copied")
    ] = Path("configs/default.yaml"),
) -> None:
    """Write a starter study on your own data: the template's strategies and seeds on one
    dataset, under its own name and MLflow store. Run it with `snakemake --configfile`."""
    from moebench.report.study import new_study as write_new_study

    with _user_errors():
        if (text is None) == (hf is None):
            raise ValueError("give exactly one of --text and --hf")
        source, data = ("file", text) if text is not None else ("hf", hf)
        study = write_new_study(template, name, source, str(data), vocab_size, output)
    runs = len(study.grid())
    typer.echo(f"wrote {output}: study {name!r}, {runs} runs; run it with\n"
               f"  snakemake --cores 2 --configfile {output}")


def schema(
    output: Annotated[Path, typer.Option(help="where to write the JSON schema")] = SCHEMA_FILE,
    check: Annotated[bool, typer.Option(help="only check that --output is up to date")] = False,
) -> None:
    """Write (or check) the JSON schema of study files, generated from StudyConfig."""
    from moebench.io import write_text
    from moebench.report.study import schema_text

    text = schema_text()
    if check:
        if not output.is_file() or output.read_text() != text:
            typer.echo(f"{output} is out of date: run `moebench schema`", err=True)
            raise typer.Exit(1)
        return
    write_text(output, text)


def mlflow_init(
    study: StudyFile,
    output: Annotated[
        Path | None,
        typer.Option(help="parent-run id file (default: <output root>/mlflow/parents/)"),
    ] = None,
) -> None:
    """Create the MLflow store, the study's experiment and its parent run (once, before the
    training jobs write concurrently); write the parent run id to a file."""
    from moebench.report.tracking import init_parent

    with _user_errors():
        cfg = load_study(study)
        run_id = init_parent(cfg, output or paths.parent_run_file(cfg.study))
    typer.echo(f"MLflow experiment {cfg.experiment!r}, parent run {run_id} at {cfg.tracking.uri}")


def aggregate(
    study: StudyFile,
    results: ResultsDir = paths.OUT,
    partial: Annotated[
        bool,
        typer.Option(help="aggregate the finished runs of a study in progress; the report "
                     "lists the runs still missing"),
    ] = False,
) -> None:
    """Collect the study's run directories into its summary, tables (compared as its `report`
    section says) and figures; log them to its MLflow parent run."""
    from moebench.report.aggregate import aggregate as run_aggregate

    with _user_errors():
        cfg = load_study(study)
        grid = _run_dirs(cfg, results)
        missing = [key for key, run in grid.items() if not _finished(run)]
        if missing and (not partial or len(missing) == len(grid)):
            unfinished = ", ".join(str(grid[key]) for key in missing)
            hint = "" if partial else " (--partial aggregates the finished ones)"
            raise ValueError(f"unfinished runs of study {cfg.study!r}{hint}: {unfinished}")
        runs = [run for key, run in grid.items() if key not in missing]
        _, written = run_aggregate(cfg.study, runs, results, cfg.report, missing)
        if cfg.tracking.uri:
            _log_parent(cfg, results, written)
    for path in written:
        typer.echo(str(path))


def _run_dirs(cfg: StudyConfig, results: Path) -> dict[tuple[str, str, int], Path]:
    """The run directory of every grid point of the study under `results`."""
    return {(d, s, n): paths.run_dir(cfg.study, d, s, n, results) for d, s, n in cfg.grid()}


def _finished(run: Path) -> bool:
    """A run directory is finished once its communication numbers are written (the last
    step of a run: train, then comm)."""
    return (run / "comm.json").is_file()


def mlflow_import(study: StudyFile, results: ResultsDir = paths.OUT) -> None:
    """Log the study's finished run directories under `results` (trained with MLflow off, e.g.
    on a GPU machine) into its MLflow store as a live run would have appeared; importing again
    skips the runs already there."""
    from moebench.report.tracking import import_runs, tracking_uri

    with _user_errors():
        cfg = load_study(study)
        uri = tracking_uri(cfg)
        runs = [run for run in _run_dirs(cfg, results).values() if _finished(run)]
        if not runs:
            where = paths.run_dir(cfg.study, "<dataset>", "<strategy>", "<n>", results)
            raise ValueError(f"no finished run of study {cfg.study!r} under {results}: no "
                             f"{where}/comm.json")
        done = import_runs(cfg, runs, results)
    for run, what in done.items():
        typer.echo(f"{what} {run}")
    typer.echo(f"MLflow experiment {cfg.experiment!r} at {uri}")


def _log_parent(cfg: StudyConfig, results: Path, files: list[Path]) -> None:
    """Log each run's communication numbers to its MLflow run and the study's tables and
    figures to its parent run (if `mlflow-init` made one)."""
    from moebench.report.tracking import PARENT_SUFFIXES, comm_metrics, log_study

    parent_file = paths.parent_run_file(cfg.study, results)
    if not parent_file.is_file():
        logger.warning(f"no MLflow parent run ({parent_file} missing): not logged")
        return
    assert cfg.tracking.uri is not None
    comm = {key: comm_metrics(run) for key, run in _run_dirs(cfg, results).items()
            if _finished(run)}
    artifacts = [p for p in files if p.suffix in PARENT_SUFFIXES]
    try:
        log_study(cfg.tracking.uri, parent_file.read_text().strip(), comm, artifacts)
    except Exception as err:  # MLflow only mirrors the files just written: warn, do not fail
        logger.warning(f"not logged to MLflow at {cfg.tracking.uri}: {err}")


def where(study: StudyFile, results: ResultsDir = paths.OUT) -> None:
    """Print where the tables, figures, report and MLflow store of a study are."""
    with _user_errors():
        cfg = load_study(study)
    name = cfg.study
    report = paths.report_file(name, results)
    lines = [
        f"study {name!r}",
        f"  summary: {paths.summary_file(name, results)}",
        f"  tables:  {paths.table_file(name, 'md', results)}, "
        f"{paths.table_file(name, 'csv', results)}",
        f"  paired differences: {paths.paired_file(name, results)}; published claims: "
        f"{paths.claims_file(name, results)}",
        f"  figures: {results / 'figures'}/{name}-*.png (and .svg)",
        f"  report:  {report}"
        + (
            ""
            if report.is_file()
            else f"  (not built: snakemake --report {report} --configfile {study})"
        ),
        f"  reference: {paths.reference_dir(name)}",
    ]
    uri = cfg.tracking.uri
    if uri is None:
        lines.append("  MLflow: disabled (tracking.uri: null)")
    else:
        lines.append(f"  MLflow: {uri}  experiment {cfg.experiment!r}")
        if uri.startswith("sqlite:"):
            lines.append(f"          mlflow ui --backend-store-uri {uri}")
    typer.echo("\n".join(lines))


ReferenceDir = Annotated[
    Path | None, typer.Option(help="reference folder (default results/reference/<study>)")
]


def check(
    study: StudyFile, reference: ReferenceDir = None, results: ResultsDir = paths.OUT
) -> None:
    """Compare a study's outputs with a reference, one verdict per strategy: identical run
    bytes on the reference's machine signature, else each mean inside the reference 95% CI.
    Exit 1 when a strategy fails."""
    from moebench.report.check import check as run_check

    with _user_errors():
        cfg = load_study(study)
        verdicts, headline = run_check(cfg, results, reference or paths.reference_dir(cfg.study))
    typer.echo(f"study {cfg.study!r} vs its reference: {headline}")
    for v in verdicts:
        typer.echo(v.line())
    if not all(v.ok for v in verdicts):
        raise typer.Exit(1)


def reference(
    study: StudyFile, reference: ReferenceDir = None, results: ResultsDir = paths.OUT
) -> None:
    """Replace a study's reference with its finished outputs and this machine's signature."""
    from moebench.report.check import write_reference

    with _user_errors():
        cfg = load_study(study)
        written = write_reference(cfg, results, reference or paths.reference_dir(cfg.study))
    typer.echo(f"{len(written)} files written to {written[-1].parent.parent}")
