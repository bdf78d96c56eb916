"""The `moebench` command line: one sub-command per pipeline stage, each a thin call into the
library. Snakemake rules call exactly these commands, so every stage runs the same by hand."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def main() -> None:
    app()


from moebench.data.cli import data  # noqa: E402

app.command("data")(data)

from moebench.train.cli import train  # noqa: E402

app.command("train")(train)

from moebench.report.cli import (  # noqa: E402
    aggregate,
    check,
    mlflow_init,
    reference,
    resolve,
    schema,
    where,
)

app.command("resolve")(resolve)
app.command("schema")(schema)
app.command("mlflow-init")(mlflow_init)
app.command("aggregate")(aggregate)
app.command("where")(where)
app.command("check")(check)
app.command("reference")(reference)

from moebench.comm.cli import comm, comm_replay  # noqa: E402

app.command("comm")(comm)
app.command("comm-replay")(comm_replay)

from moebench.kernels.cli import kernels  # noqa: E402

app.command("kernels")(kernels)
