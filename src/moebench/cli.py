"""The `moebench` command line: one sub-command per pipeline stage, each a thin call into the
library. Snakemake rules call exactly these commands, so every stage runs the same by hand."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def main() -> None:
    app()
