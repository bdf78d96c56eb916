"""Training checkpoints: one file, `last.pt`, replaced atomically (temporary file + rename),
so a kill at any moment leaves the previous complete checkpoint in place.

A checkpoint holds everything that decides the rest of the run: model and optimizer state,
the aux-loss-free bias controller, the batch-sampling and token-dropping generators, the
torch RNG states, the step, running sums for the summary, and the lines of metrics.jsonl and
timing.jsonl written so far (so resuming rewrites both files exactly as they were at that
step, whatever happened to them after it). The resolved config (tracking settings excluded)
is stored too: a checkpoint of another config is never resumed.

It is read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts
only, no pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moebench.config import RunConfig
from moebench.io import atomic_open, remove_temporaries

CKPT_NAME = "last.pt"


def identity(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the config without `tracking`
    (where results are mirrored changes nothing in the run)."""
    return cfg.model_dump(mode="json", exclude={"tracking"})


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` to ckpt_dir/last.pt atomically; returns the path."""
    path = Path(ckpt_dir) / CKPT_NAME
    remove_temporaries(ckpt_dir, [CKPT_NAME])  # a checkpoint write cut short by a kill
    with atomic_open(path, "wb") as f:  # a file object: a full disk is an OSError, not a
        torch.save(state, f)  # RuntimeError of torch's own writer
    return path


def load_checkpoint(ckpt_dir: Path | None) -> dict[str, Any] | None:
    """The last checkpoint in `ckpt_dir`, or None when there is none."""
    if ckpt_dir is None:
        return None
    path = Path(ckpt_dir) / CKPT_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file is a user-facing error, not a traceback
        raise ValueError(
            f"checkpoint {path} cannot be read ({err}); delete it to restart"
        ) from None


def matches(state: dict[str, Any], cfg: RunConfig) -> bool:
    """True when the checkpoint was written by a run of this config."""
    return state.get("identity") == identity(cfg)
