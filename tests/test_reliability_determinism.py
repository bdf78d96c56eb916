"""Same seeds, same bytes on CPU: the settings that make it so hold for the shipped CPU
studies. The end-to-end proof (a study produced twice from scratch, once through kills,
byte-identical) is in test_reliability_snakemake.py; kill-and-resume equality in
test_reliability_kill.py.

Settings (README, "Same seeds, same bytes"): one torch thread per training run
(`resources.train.threads: 1` -> `train.threads`), deterministic algorithms and float32 on
CPU, every random draw from the run's seed, wall-clock numbers kept out of the results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moebench.config import load_study

REPO = Path(__file__).resolve().parents[1]
CPU_STUDIES = ("default.yaml", "test.yaml")


@pytest.mark.parametrize("name", CPU_STUDIES)
def test_cpu_studies_train_single_threaded_on_cpu_math(name: str) -> None:
    """Every run of the shipped CPU studies uses one torch thread and no GPU-only path."""
    study = load_study(REPO / "configs" / name)
    for dataset in study.datasets:
        for strategy in study.strategies:
            for seed in study.seeds:
                cfg = study.run_config(dataset, strategy, seed)
                assert cfg.train.threads == 1, (name, strategy)
                assert cfg.train.device in ("auto", "cpu"), (name, strategy)

