"""The `moebench` command line: one sub-command per pipeline stage, each a thin call into the
library. Snakemake rules call exactly these commands, so every stage runs the same by hand."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, TextIO

import typer

# Plain Click help: paragraphs re-wrapped to the terminal, no type labels on flags.
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=__doc__, rich_markup_mode=None
)


class StderrHandler(logging.StreamHandler):
    """A plain handler on whatever `sys.stderr` is when a record is emitted (test runners
    swap it per command), so stdout stays free for results."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        """The stream is always the current sys.stderr."""


WARNING_MARK = "warning: "
"""Begins the message of a warning line (`[module] warning: ...`); the workflow collects
these lines from the job logs when it ends."""


class LevelFormatter(logging.Formatter):
    """`[module] message`, with WARNING_MARK (or the level's name) before warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        mark = "" if record.levelno < logging.WARNING else (
            WARNING_MARK if record.levelno == logging.WARNING else f"{record.levelname.lower()}: "
        )
        return f"[{record.name}] {mark}{record.getMessage()}"


def configure_logging() -> None:
    """INFO progress of every `moebench.*` module on stderr, one `[module] message` line each;
    calling it again replaces the handler instead of adding one."""
    handler = StderrHandler()
    handler.setFormatter(LevelFormatter())
    logger = logging.getLogger("moebench")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)


def _print_version(value: bool) -> None:
    """`--version`: print the package version and exit."""
    if value:
        from moebench import __version__

        typer.echo(f"moebench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the "
                     "version and exit"),
    ] = False,
) -> None:
    configure_logging()


def main() -> None:
    app()


from moebench.data.cli import data  # noqa: E402

app.command("data")(data)

from moebench.train.cli import train  # noqa: E402

app.command("train")(train)

from moebench.report.cli import (  # noqa: E402
    aggregate,
    check,
    fits,
    mlflow_import,
    mlflow_init,
    new_study,
    reference,
    resolve,
    schema,
    where,
)

app.command("new-study")(new_study)
app.command("resolve")(resolve)
app.command("fits")(fits)
app.command("schema")(schema)
app.command("mlflow-init")(mlflow_init)
app.command("mlflow-import")(mlflow_import)
app.command("aggregate")(aggregate)
app.command("where")(where)
app.command("check")(check)
app.command("reference")(reference)

from moebench.comm.cli import comm, comm_replay, placement, placement_replay  # noqa: E402

app.command("comm")(comm)
app.command("comm-replay")(comm_replay)
app.command("placement")(placement)
app.command("placement-replay")(placement_replay)

from moebench.kernels.cli import kernels  # noqa: E402

app.command("kernels")(kernels)
