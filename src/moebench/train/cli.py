"""`moebench train`: one training run from a run config into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moebench.config import load_run_config
from moebench.train.loop import TrainingDivergedError
from moebench.train.loop import train as train_run

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def train(
    config: Annotated[
        Path | None, typer.Option("--config", help="run config YAML (default: built-in defaults)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                         help="override, e.g. train.steps=100 (repeatable)")
    ] = None,
    *,
    out: Annotated[Path, typer.Option("--out", help="run directory to write")],
    ckpt_dir: Annotated[
        Path | None,
        typer.Option("--ckpt-dir", help="checkpoints (default <output root>/ckpt/<study>/<dataset>/"
                     "<strategy>/seed~<n>); the last one is resumed"),
    ] = None,
) -> None:
    """Train one run; resumes from the last checkpoint. Exit 2: bad input (nothing written
    under --out); exit 3: NaN/inf loss or router logits (the last good checkpoint is kept)."""
    try:
        cfg = load_run_config(config, set_ or [])
        summary = train_run(cfg, out, ckpt_dir)
    except (ValueError, OSError) as err:
        typer.echo(f"moebench train: error: {err}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except TrainingDivergedError as err:
        typer.echo(f"moebench train: error: {err}", err=True)
        raise typer.Exit(EXIT_DIVERGED) from None
    typer.echo(f"{out}: val_loss {summary['val_loss']:.4f}, "
               f"maxvio_global {summary['maxvio_global']:.4f}")
