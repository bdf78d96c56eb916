"""A tiny study through `--executor slurm` on a real one-node SLURM cluster, started here by
tests/slurm/local-cluster.sh (root: it installs slurm-wlm + munge with apt-get and writes
/etc/slurm/slurm.conf), with the test profile workflow/profiles/slurm-test (squeue status,
no account, partition debug); its training is a 2-task job launched through srun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moebench.report import paths
from moebench.report.summary import SUMMARY_SCHEMA

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_tiny_dag_runs_through_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    study = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    # Training runs distributed: 2 processes (data + expert parallel), one per device of a
    # 1 node x 2 GPU topology, launched by `srun -n 2` inside a 2-task SLURM job.
    study["base"]["topology"] = {"num_nodes": 1, "gpus_per_node": 2}
    study["base"]["router"] = {"num_experts": 8, "top_k": 2, "group_limit": 1}
    study["resources"]["train"] |= {"tasks": 2}
    study |= {
        "study": "slurm",
        "seeds": [0],
        "strategies": {"aux_free": study["strategies"]["aux_free"]},
        "tracking": {"uri": None},
    }
    study_file = tmp_path / "slurm.yaml"
    study_file.write_text(yaml.safe_dump(study))
    workdir = tmp_path / "wd"
    res = subprocess.run(
        [
            sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--workflow-profile", str(REPO / "workflow/profiles/slurm-test"),
            "--configfile", str(study_file), "--slurm-keep-successful-logs",
        ],
        capture_output=True, text=True, timeout=900, check=False,
        env=os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    df = pd.read_parquet(paths.summary_file("slurm", workdir / "work"))
    SUMMARY_SCHEMA.validate(df)
    assert df[["study", "strategy", "seed"]].values.tolist() == [["slurm", "aux_free", 0]]
    # The cluster ran the heavy rules (local rules stay on the submitting host).
    slurm_logs = workdir / ".snakemake/slurm_logs"
    ran = {p.name for p in slurm_logs.iterdir()}
    assert {"rule_data", "rule_kernels", "rule_train", "rule_comm"} <= ran
    assert not {"rule_resolve", "rule_aggregate", "rule_data_config"} & ran
    run = paths.run_dir("slurm", "shakespeare", "aux_free", 0, workdir / "work")
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
