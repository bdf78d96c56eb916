"""Training: the loop (`train`, `Trainer`), checkpoints, the routing trace and MLflow."""

from moebench.train.loop import (
    TIMING_KEYS,
    Run,
    Trainer,
    TrainingDivergedError,
    default_ckpt_dir,
    lr_at,
    prepare,
    train,
)

__all__ = [
    "TIMING_KEYS",
    "Run",
    "Trainer",
    "TrainingDivergedError",
    "default_ckpt_dir",
    "lr_at",
    "prepare",
    "train",
]
