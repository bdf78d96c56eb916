"""A SLURM run without a partition is refused at start, before any job is submitted."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fake_cluster(bin_dir: Path, partitions: str) -> None:
    """A whole SLURM client of its own, whatever the machine has installed: `sinfo` listing
    `partitions`, `sbatch` that records it was called, and the `squeue`, `sacct` and
    `scontrol` the executor plugin looks for (an empty queue, no accounting)."""
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\necho '{partitions}'\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {bin_dir}/sbatch-called\nexit 1\n")
    for name in ("squeue", "sacct", "scontrol"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def slurm_run(tmp_path: Path, partitions: str, *extra: str) -> subprocess.CompletedProcess[str]:
    fake_cluster(tmp_path / "bin", partitions)
    shutil.copy(REPO / "configs/test.yaml", tmp_path / "study.yaml")
    env = {
        "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "study.yaml"),
        "--executor",
        "slurm",
        "--jobs",
        "1",
        "--slurm-no-account",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
def test_no_partition_and_no_default_partition_is_refused_before_any_job(tmp_path: Path) -> None:
    res = slurm_run(tmp_path, "debug")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "slurm_partition is not set" in out and "--default-resources slurm_partition=" in out
    assert not (tmp_path / "bin/sbatch-called").exists()
    assert not (tmp_path / "work" / "runs").exists()
