"""The pipeline under failure: the tiny study (configs/test.yaml, the default study's shape;
MLflow off to save time) run by Snakemake while its jobs are killed, next to a clean run.

- A training job killed by SIGKILL fails the job: Snakemake reports it and deletes the job's
  outputs (none of them stays visible); the other runs finish (--keep-going).
- Snakemake itself killed (SIGKILL) during a training job leaves incomplete outputs and its
  lock: the next run refuses, naming the incomplete files (`--rerun-incomplete`), then the
  lock (`--unlock`); after both the job reruns and resumes from its last checkpoint.
- The recovered study's tables, summary and run files equal the clean run's byte for byte
  (wall-clock fields and the git commit aside): same seeds, same bytes, whatever happened.
- SLURM (marked `slurm`): a training job cancelled with `scancel` is reported and rerun by
  `--retries 1`, resuming from its checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from moebench.io import LOCK_NAME
from moebench.report import paths
from moebench.report.summary import SUMMARY_SCHEMA
from moebench.train import TIMING_KEYS
from moebench.train.checkpoint import CKPT_NAME
from test_reliability_kill import assert_no_partial_file, kill_hook_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TEST_STUDY = REPO / "configs/test.yaml"
TRAIN_FILES = ("config.resolved.yaml", "metrics.jsonl", "timing.jsonl", "summary.json",
               "routing_trace.parquet")
VICTIM = ("test", "shakespeare", "aux_free", 1)
"""The run whose training job gets killed (12 steps, checkpoints at 6 and 12)."""
KILL_AT = "step:8"
VARYING = (*TIMING_KEYS, "git_sha")
"""Summary fields that may differ between two runs: wall clock, and the commit."""


def study_file(folder: Path, **over: object) -> Path:
    """configs/test.yaml without MLflow (plus `over`), written into `folder`."""
    study = yaml.safe_load(TEST_STUDY.read_text()) | {"tracking": {"uri": None}} | over
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Snakemake on the study file of `workdir` (see `study_file`)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "study.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)


def logs(workdir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((workdir / "work/logs").rglob("*.log")))


def ok(res: subprocess.CompletedProcess[str], workdir: Path) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + logs(workdir)[-3000:]


def victim_ckpt_step(workdir: Path) -> int:
    return torch.load(workdir / paths.ckpt_dir(*VICTIM) / CKPT_NAME, weights_only=True)["step"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study run from scratch, undisturbed."""
    workdir = tmp_path_factory.mktemp("clean")
    study_file(workdir)
    ok(snakemake(workdir, kill_hook_env(workdir / ".hook"), "--cores", "2"), workdir)
    return workdir


@dataclass
class Recovery:
    """The study run from scratch through failures (see `recovered`)."""

    workdir: Path
    failed: subprocess.CompletedProcess[str]
    victim_files_after_failure: list[str]
    victim_ckpt_after_failure: int
    killed: subprocess.CompletedProcess[str]
    visible_after_kill: set[str]
    refused: subprocess.CompletedProcess[str]
    locked: subprocess.CompletedProcess[str]
    unlocked: subprocess.CompletedProcess[str]
    resumed: subprocess.CompletedProcess[str]
    victim_log: str


@pytest.fixture(scope="module")
def recovered(tmp_path_factory: pytest.TempPathFactory) -> Recovery:
    """1. The victim's training job SIGKILLs itself at step 8 (--keep-going);
    2. on the rerun, it kills Snakemake and itself at step 8;
    3. a plain rerun is refused (incomplete files); 4. so is one with `--rerun-incomplete`
    (the killed Snakemake's lock); 5. `--unlock`; 6. `--rerun-incomplete` finishes."""
    workdir = tmp_path_factory.mktemp("recovered")
    study_file(workdir)
    victim = paths.run_dir(*VICTIM)
    only = "/".join(victim.parts[-2:])  # aux_free/seed~1: the victim's train command
    hook = workdir / ".hook"

    env = kill_hook_env(hook, spec=KILL_AT, only=only, once=str(hook / "killed_job"))
    failed = snakemake(workdir, env, "--cores", "2", "--keep-going")
    # the killed writer's lock file stays (stale: nobody holds it, the rerun takes it over)
    victim_files = sorted(p.name for p in (workdir / victim).glob("*") if p.name != LOCK_NAME)
    ckpt_after_failure = victim_ckpt_step(workdir)

    env = kill_hook_env(hook, spec=KILL_AT, only=only, once=str(hook / "killed_snakemake"),
                        action="snakemake")
    killed = snakemake(workdir, env, "--cores", "2")
    visible = assert_no_partial_file(workdir / "work")

    plain = kill_hook_env(hook)
    refused = snakemake(workdir, plain, "--cores", "2")
    locked = snakemake(workdir, plain, "--cores", "2", "--rerun-incomplete")
    unlocked = snakemake(workdir, plain, "--unlock")
    resumed = snakemake(workdir, plain, "--cores", "2", "--rerun-incomplete")
    log = workdir / "work/logs/test/train/shakespeare/aux_free/seed~1.log"
    return Recovery(workdir, failed, victim_files, ckpt_after_failure, killed, visible,
                    refused, locked, unlocked, resumed, log.read_text())


def test_failed_job_is_reported_and_leaves_no_outputs(recovered: Recovery) -> None:
    r = recovered
    assert r.failed.returncode != 0
    assert "Error in rule train" in r.failed.stderr and "seed~1" in r.failed.stderr
    assert r.victim_files_after_failure == []  # Snakemake removed the failed job's outputs
    assert r.victim_ckpt_after_failure == 6  # checkpoints live outside the run directory and stay
    finished = [paths.run_dir("test", "shakespeare", s, n) / "comm.json"
                for s in ("aux_free", "aux_loss") for n in (0, 1) if (s, n) != VICTIM[2:]]
    assert all((r.workdir / f).is_file() for f in finished)  # --keep-going ran the others


def test_killed_snakemake_is_recovered_by_rerun_incomplete(recovered: Recovery) -> None:
    r = recovered
    assert r.killed.returncode == -9
    victim = paths.run_dir(*VICTIM).as_posix().removeprefix("work/")
    assert {f"{victim}/{n}" for n in ("config.resolved.yaml", "metrics.jsonl")} <= (
        r.visible_after_kill)  # incomplete but every visible file is whole
    assert r.refused.returncode != 0
    assert "seem to be incomplete" in r.refused.stderr
    assert "--rerun-incomplete" in r.refused.stderr
    assert f"{paths.run_dir(*VICTIM)}/metrics.jsonl" in r.refused.stderr
    assert r.locked.returncode != 0
    assert "Directory cannot be locked" in r.locked.stderr and "--unlock" in r.locked.stderr
    assert r.unlocked.returncode == 0
    ok(r.resumed, r.workdir)
    assert "resuming from step 6" in r.victim_log
    assert set(TRAIN_FILES) <= {p.name for p in (r.workdir / paths.run_dir(*VICTIM)).iterdir()}


def test_recovered_study_equals_clean_study_byte_for_byte(
    recovered: Recovery, clean: Path
) -> None:
    """Same seeds, same bytes: every run file, the tables and figures, summary.parquet; only
    the wall-clock measurements of summary.json/.parquet (tokens/s, MFU, elapsed time) differ,
    and the git commit when the repository changed between the two runs."""
    a, b = recovered.workdir / "work", clean / "work"
    runs = sorted(p.relative_to(b) for p in (b / "runs").glob("*/*/*/seed~*"))
    assert len(runs) == 4
    for run in runs:
        for name in ("config.resolved.yaml", "metrics.jsonl", "routing_trace.parquet",
                     "comm.parquet", "comm.json"):
            assert (a / run / name).read_bytes() == (b / run / name).read_bytes(), run / name
        one, two = (json.loads((d / run / "summary.json").read_text()) for d in (a, b))
        assert {k: v for k, v in one.items() if k not in VARYING} == {
            k: v for k, v in two.items() if k not in VARYING}
    df_a, df_b = (pd.read_parquet(paths.summary_file("test", d)) for d in (a, b))
    SUMMARY_SCHEMA.validate(df_a)
    pd.testing.assert_frame_equal(df_a.drop(columns=list(VARYING)),
                                  df_b.drop(columns=list(VARYING)))
    for kind in ("csv", "md"):
        table_a, table_b = (paths.table_file("test", kind, d).read_bytes() for d in (a, b))
        assert table_a == table_b, kind
    for png in sorted((b / "figures").glob("*.png")):
        assert (a / "figures" / png.name).read_bytes() == png.read_bytes(), png.name


# --- SLURM ---------------------------------------------------------------------------------


@pytest.mark.slurm
def test_scancelled_slurm_job_is_reported_and_rerun(slurm_cluster: None,
                                                    tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    workdir.mkdir()
    aux_free = yaml.safe_load(TEST_STUDY.read_text())["strategies"]["aux_free"]
    study_file(workdir, study="cancel", seeds=[0], strategies={"aux_free": aux_free})
    env = kill_hook_env(tmp_path / "hook", spec=KILL_AT, only="train --config",
                        once=str(tmp_path / "hook" / "cancelled"), action="scancel")
    res = snakemake(workdir, env, "--workflow-profile",
                    str(REPO / "workflow/profiles/slurm-test"), "--retries", "1")
    ok(res, workdir)
    assert (tmp_path / "hook" / "cancelled").exists()  # the first attempt did cancel itself
    out = res.stdout + res.stderr
    assert "Error in rule train" in out and "CANCELLED" in out.upper()
    log = (workdir / "work/logs/cancel/train/shakespeare/aux_free/seed~0.log").read_text()
    assert "resuming from step 6" in log
    df = pd.read_parquet(paths.summary_file("cancel", workdir / "work"))
    assert df[["study", "strategy", "seed", "steps"]].values.tolist() == [
        ["cancel", "aux_free", 0, 12]]
