"""A tiny study through `--executor slurm` on a real one-node SLURM cluster, started here by
tests/slurm/local-cluster.sh (root: it installs slurm-wlm + munge with apt-get and writes
/etc/slurm/slurm.conf), with the test profile workflow/profiles/slurm-test (squeue status,
no account, partition debug); its training is a 2-task job launched through srun. Then the
same on the two-node cluster of tests/slurm/two-node-cluster.sh (tasks 4, nodes 2), and a
node failure in the middle of its training, resumed by `--rerun-incomplete`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moebench.report import paths
from moebench.report.summary import SUMMARY_SCHEMA
from moebench.train.checkpoint import CKPT_NAME

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TWO_NODES = REPO / "tests" / "slurm" / "two-node-cluster.sh"


def snakemake(study_file: Path, workdir: Path, *extra: str) -> list[str]:
    """The Snakemake command of `study_file` in `workdir` with the SLURM test profile."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--workflow-profile", str(REPO / "workflow/profiles/slurm-test"),
            "--configfile", str(study_file), *extra]


def with_bin(env: dict[str, str]) -> dict[str, str]:
    return env | {"PATH": f"{BIN}{os.pathsep}{env['PATH']}"}


def slurm_study(tmp_path: Path, name: str, topology: dict[str, int], tasks: int, nodes: int,
                router: dict[str, int] | None = None) -> Path:
    """The tiny study's aux_free run, seed 0, as study `name` on `topology`, its training a
    `tasks`-task job over `nodes` SLURM nodes: the study file."""
    study = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    study["base"]["topology"] = topology
    if router is not None:
        study["base"]["router"] = router
    study["resources"]["train"] |= {"tasks": tasks, "nodes": nodes}
    study |= {
        "study": name,
        "seeds": [0],
        "strategies": {"aux_free": study["strategies"]["aux_free"]},
        "tracking": {"uri": None},
    }
    study_file = tmp_path / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump(study))
    return study_file


def test_tiny_dag_runs_through_slurm(slurm_cluster: None, tmp_path: Path) -> None:
    # Training runs distributed: 2 processes (data + expert parallel), one per device of a
    # 1 node x 2 GPU topology, launched by `srun -n 2` inside a 2-task SLURM job.
    study_file = slurm_study(tmp_path, "slurm", {"num_nodes": 1, "gpus_per_node": 2}, 2, 1,
                             {"num_experts": 8, "top_k": 2, "group_limit": 1})
    workdir = tmp_path / "wd"
    res = subprocess.run(snakemake(study_file, workdir, "--slurm-keep-successful-logs"),
                         capture_output=True, text=True, timeout=900, check=False,
                         env=with_bin(dict(os.environ)))
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


# ---- two nodes -------------------------------------------------------------------------------
def two_node_study(tmp_path: Path) -> Path:
    """On 2 nodes x 2 GPUs: 4 ranks, 2 on each SLURM node."""
    return slurm_study(tmp_path, "two", {"num_nodes": 2, "gpus_per_node": 2}, 4, 2)


def test_tiny_dag_across_two_nodes_survives_a_node_failure(
    two_node_cluster: dict[str, str], tmp_path: Path
) -> None:
    """The study through `--executor slurm` on the two-node cluster, its training a 4-task
    job over both nodes. node2 crashes (its slurmd, job step and ranks killed) once training
    has checkpointed: the job and Snakemake fail, naming the node. With node2 back,
    `--rerun-incomplete` resumes from the checkpoint and finishes the study; its training
    files are, byte for byte, those of the same config trained straight through by srun
    (run while Snakemake waits out its status-check interval)."""
    study_file, workdir = two_node_study(tmp_path), tmp_path / "wd"
    env = with_bin(two_node_cluster)
    ckpt = paths.ckpt_dir("two", "shakespeare", "aux_free", 0, workdir / "work") / CKPT_NAME
    log = workdir / paths.log_file("two", "train/shakespeare/aux_free/seed~0")
    straight = tmp_path / "straight"
    proc = subprocess.Popen(snakemake(study_file, workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        subprocess.run(["bash", str(TWO_NODES), "crash", "node2"], check=True)
        while "Node failure on node2" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        subprocess.run(["bash", str(TWO_NODES), "boot", "node2"], check=True)
        wait_for_idle_nodes(env)
        config = workdir / paths.run_config_file("two", "shakespeare", "aux_free", 0)
        res = subprocess.run(
            ["srun", "--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", "--time=10",
             "moebench", "train", "--config", str(config), "--out", str(straight),
             "--ckpt-dir", str(tmp_path / "ckpt")],
            cwd=workdir, capture_output=True, text=True, timeout=600, check=False, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, "the run ended before node2 crashed"
    assert "Error in rule train" in output
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 12

    res = subprocess.run(snakemake(study_file, workdir, "--rerun-incomplete"),
                         capture_output=True, text=True, timeout=600, check=False, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"resuming from step {killed_at}" in log.read_text()
    df = pd.read_parquet(paths.summary_file("two", workdir / "work"))
    SUMMARY_SCHEMA.validate(df)
    assert df[["study", "strategy", "seed"]].values.tolist() == [["two", "aux_free", 0]]
    run = paths.run_dir("two", "shakespeare", "aux_free", 0, workdir / "work")
    assert json.loads((run / "summary.json").read_text())["world_size"] == 4
    for name in ("metrics.jsonl", "routing_trace.parquet"):
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


def wait_for_idle_nodes(env: dict[str, str]) -> None:
    """Until both nodes are back in service (a minute at most)."""
    for _ in range(120):
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             env=env, check=True)
        if res.stdout.split() == ["idle"]:
            return
        time.sleep(0.5)


def test_two_node_cluster_says_why_where_namespaces_are_not_permitted() -> None:
    """In a user namespace (root inside, no privilege over the host's mounts), `ip netns
    add` is refused: the script stops at once, naming the cause, and leaves nothing behind."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to be refused for a missing privilege, not for the user)")
    namespaces = set(Path("/var/run/netns").glob("*"))
    res = subprocess.run(["unshare", "--user", "--map-root-user", "bash", str(TWO_NODES),
                          "start"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert "network namespaces are not permitted here" in res.stderr
    assert "CAP_NET_ADMIN and CAP_SYS_ADMIN" in res.stderr
    assert set(Path("/var/run/netns").glob("*")) == namespaces
