"""`moebench data`: prepare the token files of a run config's data section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moebench.config import load_run_config
from moebench.data.build import prepare


def data(
    config: Annotated[
        Path | None, typer.Option("--config", help="run config YAML (default: built-in defaults)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="override, e.g. data.vocab_size=512"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="output directory (default: the config's data_dir)")
    ] = None,
) -> None:
    """Write train.bin, val.bin, tokenizer.json and manifest.json (skipped if up to date)."""
    try:
        cfg = load_run_config(config, set_ or [])
        out_dir = out if out is not None else Path(cfg.data_dir)
        manifest = prepare(cfg.data, out_dir, cfg.seed)
    except (ValueError, OSError) as err:
        typer.echo(f"moebench data: error: {err}", err=True)
        raise typer.Exit(2) from None
    sizes = ", ".join(f"{k} {v['n_tokens']} tokens" for k, v in manifest["splits"].items())
    typer.echo(f"{out_dir}: {manifest['source']}, vocab_size {manifest['vocab_size']}, {sizes}")
