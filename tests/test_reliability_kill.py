"""kill -9 at five points of the pipeline (data prep, mid-training, inside a checkpoint write,
inside the comm stage, inside aggregation): no partial file is ever visible, and the rerun
(or resume) ends with the same outputs as an uninterrupted run.

The kill is SIGKILL sent by the child to itself at an exact point, so no test waits on a
clock: `moebench_kill_hook` (written to a temporary folder, imported by the child before
`moebench.cli`) wraps `moebench.io.atomic_path` (kill after the n-th write of a file reached
its temporary file, before the rename) or `Trainer.train_step` (kill when a step starts).
The Snakemake tests reuse it through a `moebench` wrapper on PATH (`kill_hook_env`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from moebench.cli import app
from moebench.data import prepare as prepare_data
from moebench.io import LOCK_NAME
from moebench.train import TIMING_KEYS
from moebench.train.checkpoint import CKPT_NAME
from test_reliability_inputs import DATA, RUN, rel_study

KILL_HOOK = '''"""Test-only: SIGKILL this process at one point chosen by the environment.

MOEBENCH_KILL=write:<file name>:<n>  after the n-th atomic write of <file name> has filled its
                                     temporary file, before the rename onto <file name>
MOEBENCH_KILL=step:<n>               when a training step starts with n steps done
MOEBENCH_KILL_ONLY=<text>            only in a process whose arguments contain <text>
MOEBENCH_KILL_ONCE=<file>            only if <file> is absent; it is created before the kill
MOEBENCH_KILL_ACTION=self            SIGKILL this process (default)
                    =snakemake       SIGKILL the Snakemake process that started this job first
                    =scancel         `scancel $SLURM_JOB_ID`, then wait for SLURM to end us
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _snakemake_ancestor():
    pid = os.getppid()
    while pid > 1:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\\0")
        if any(a == b"snakemake" or a.endswith((b"/snakemake", b"snakemake/__main__.py"))
               for a in args):
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise SystemExit("MOEBENCH_KILL_ACTION=snakemake outside Snakemake")


def _die():
    once = os.environ.get("MOEBENCH_KILL_ONCE")
    if once:
        Path(once).touch()
    action = os.environ.get("MOEBENCH_KILL_ACTION", "self")
    if action == "snakemake":
        os.kill(_snakemake_ancestor(), signal.SIGKILL)
    elif action == "scancel":
        subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], check=True)
        time.sleep(600)  # SLURM ends the job step; never returns
    os.kill(os.getpid(), signal.SIGKILL)


def arm():
    spec = os.environ.get("MOEBENCH_KILL", "")
    only, once = os.environ.get("MOEBENCH_KILL_ONLY"), os.environ.get("MOEBENCH_KILL_ONCE")
    if not spec or (only and only not in " ".join(sys.argv)) or (once and Path(once).exists()):
        return
    kind, _, arg = spec.partition(":")
    if kind == "write":
        name, _, nth = arg.rpartition(":")
        import moebench.io as io  # patched before any module binds atomic_path by name

        original, seen = io.atomic_path, [0]

        @contextlib.contextmanager
        def atomic_path(path):
            with original(path) as tmp:
                yield tmp
                if Path(path).name == name:
                    seen[0] += 1
                    if seen[0] == int(nth):
                        _die()

        io.atomic_path = atomic_path
    elif kind == "step":
        from moebench.train.loop import Trainer

        train_step = Trainer.train_step

        def killing_step(self):
            if self.step == int(arg):
                _die()
            return train_step(self)

        Trainer.train_step = killing_step
    else:
        raise SystemExit(f"bad MOEBENCH_KILL={spec!r}")
'''

BOOT = "import moebench_kill_hook as h; h.arm(); from moebench.cli import main; main()"
TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")
"""Temporary files of moebench.io.atomic_path: `.<final name>.<random>.tmp`."""


def kill_hook_env(folder: Path, **kill: str) -> dict[str, str]:
    """Write the hook and a `moebench` wrapper that arms it into `folder`; return an
    environment whose PATH and PYTHONPATH reach them, plus the MOEBENCH_KILL* variables
    `kill` names (spec=..., only=..., once=..., action=...)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "moebench_kill_hook.py").write_text(KILL_HOOK)
    wrapper = folder / "moebench"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{BOOT}" "$@"\n')
    wrapper.chmod(0o755)
    names = {"spec": "MOEBENCH_KILL"} | {k: f"MOEBENCH_KILL_{k.upper()}"
                                         for k in ("only", "once", "action")}
    env = {k: v for k, v in os.environ.items() if k not in names.values()}
    env["PATH"] = os.pathsep.join([str(folder), str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    return env | {names[k]: v for k, v in kill.items()}


def run_killed(tmp: Path, argv: list[str], spec: str) -> None:
    """`moebench <argv>` in a child killed by SIGKILL at `spec` (it must die there)."""
    env = kill_hook_env(tmp / "hook", spec=spec)
    proc = subprocess.run([sys.executable, "-c", BOOT, *argv], env=env, cwd=tmp,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {spec}:\n{proc.stderr}"


def assert_no_partial_file(folder: Path) -> set[str]:
    """Every visible file under `folder` is complete (it parses as its kind); hidden ones are
    atomic_path temporaries or a killed run's lock file. Returns the visible files' paths."""
    visible = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name.startswith("."):  # a killed writer's lock file is stale, not held
            assert TMP_NAME.match(path.name) or path.name == LOCK_NAME, f"unexpected {rel}"
            continue
        visible.add(rel)
        if path.suffix == ".log":  # a job's log (under the output root) may be empty
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            text = path.read_text()
            assert text == "" or text.endswith("\n"), f"{rel} ends inside a line"
            [json.loads(line) for line in text.splitlines()]
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), rel
        elif path.suffix != ".log":  # a job's log may be empty
            assert path.stat().st_size > 0, f"{rel} is empty"
    return visible


def same_files(a: Path, b: Path, wall_clock: tuple[str, ...] = ()) -> None:
    """The visible files of `a` and `b` have the same names and bytes (of the `wall_clock`
    files: .json equal without the keys TIMING_KEYS, .jsonl the same steps)."""
    files_a, files_b = assert_no_partial_file(a), assert_no_partial_file(b)
    assert files_a == files_b
    for rel in sorted(files_a):
        if rel in wall_clock and rel.endswith(".json"):
            one, two = (json.loads((d / rel).read_text()) for d in (a, b))
            for key in TIMING_KEYS:
                one.pop(key), two.pop(key)
            assert one == two, rel
        elif rel in wall_clock:
            steps = [[json.loads(x)["step"] for x in (d / rel).read_text().splitlines()]
                     for d in (a, b)]
            assert steps[0] == steps[1], rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


WALL_CLOCK = ("summary.json", "timing.jsonl")
"""Run files holding wall-clock measurements (tokens/s, MFU, elapsed time)."""


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pipeline in one folder: data/, run.yaml, trained/ (the run directory
    after training), ckpt/, and a results tree with that run after comm, and its aggregation."""
    root = tmp_path_factory.mktemp("reliability_reference")
    prepare_data(DATA, root / "data", seed=0)
    (root / "run.yaml").write_text(yaml.safe_dump(RUN | {"data_dir": str(root / "data")}))
    (root / "data.yaml").write_text(yaml.safe_dump({"data": DATA.model_dump(mode="json")}))
    run = root / "results" / "runs" / "rel" / "syn" / "aux_free" / "seed~0"
    for argv in (
        ["train", "--config", str(root / "run.yaml"), "--out", str(root / "trained"),
         "--ckpt-dir", str(root / "ckpt")],
        ["comm", "--trace", str(run / "routing_trace.parquet"), "--out", str(run)],
        ["aggregate", "--results", str(root / "results"), "--study", str(rel_study(root))],
    ):
        if argv[0] == "comm":
            shutil.copytree(root / "trained", run)
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
    return root


def ref_run(reference: Path) -> Path:
    return reference / "results" / "runs" / "rel" / "syn" / "aux_free" / "seed~0"


def test_kill_during_data_prep_then_rerun_rebuilds_identical_files(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data"
    argv = ["data", "--config", str(reference / "data.yaml"), "--out", str(out)]
    run_killed(tmp_path, argv, "write:val.bin:1")
    assert assert_no_partial_file(out) == {"tokenizer.json", "train.bin"}  # no manifest yet
    assert any(TMP_NAME.match(p.name) for p in out.iterdir())
    refused = CliRunner().invoke(app, ["train", "--config", str(reference / "run.yaml"),
                                       "--set", f"data_dir={out}", "--out", str(tmp_path / "r")])
    assert refused.exit_code == 2 and "manifest.json is missing" in refused.stderr

    assert CliRunner().invoke(app, argv).exit_code == 0
    same_files(out, reference / "data")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temporaries cleaned


@pytest.mark.parametrize(
    ("spec", "resumed_from"),
    [("step:5", 4), ("write:last.pt:2", 2)],
    ids=["mid_training", "inside_checkpoint_write"],
)
def test_kill_during_training_then_resume_gives_identical_outputs(
    spec: str, resumed_from: int, reference: Path, tmp_path: Path
) -> None:
    """Checkpoints every 2 of 8 steps. `step:5`: killed as step 6 starts (checkpoint 4
    written, step 5 lost); `write:last.pt:2`: killed inside the second checkpoint's write,
    after torch.save filled the temporary file, before the rename (checkpoint 2 survives)."""
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    argv = ["train", "--config", str(reference / "run.yaml"), "--out", str(out),
            "--ckpt-dir", str(ckpt)]
    run_killed(tmp_path, argv, spec)
    assert assert_no_partial_file(out) <= {"config.resolved.yaml", "metrics.jsonl",
                                           "timing.jsonl"}
    assert assert_no_partial_file(ckpt) == {CKPT_NAME}
    assert torch.load(ckpt / CKPT_NAME, weights_only=True)["step"] == resumed_from

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert f"resuming from step {resumed_from}" in result.stderr
    same_files(out, reference / "trained", wall_clock=WALL_CLOCK)
    assert [p.name for p in ckpt.iterdir()] == [CKPT_NAME]  # the cut-short write is cleaned
    assert torch.load(ckpt / CKPT_NAME, weights_only=True)["step"] == 8


def test_kill_during_comm_then_rerun_gives_identical_outputs(
    reference: Path, tmp_path: Path
) -> None:
    """Killed inside the write of comm.json, after comm.parquet is in place."""
    run = tmp_path / "run"
    shutil.copytree(ref_run(reference), run)
    for name in ("comm.json", "comm.parquet"):
        (run / name).unlink()
    argv = ["comm", "--trace", str(run / "routing_trace.parquet"), "--out", str(run)]
    run_killed(tmp_path, argv, "write:comm.json:1")
    assert "comm.json" not in assert_no_partial_file(run)

    assert CliRunner().invoke(app, argv).exit_code == 0
    same_files(run, ref_run(reference))
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # temporaries cleaned


def test_kill_during_aggregation_then_rerun_gives_identical_outputs(
    reference: Path, tmp_path: Path
) -> None:
    """Killed inside the write of the study's Markdown table, after the figures are in
    place: no summary.parquet (removed first, written last), so nothing reads the
    aggregation as complete."""
    results = tmp_path / "results"
    shutil.copytree(reference / "results" / "runs", results / "runs")
    argv = ["aggregate", "--results", str(results), "--study", str(rel_study(tmp_path))]
    run_killed(tmp_path, argv, "write:rel.md:1")
    visible = assert_no_partial_file(results)
    assert "tables/rel.parquet" not in visible and "tables/rel.md" not in visible
    assert "figures/rel-syn-maxvio_batch.png" in visible

    assert CliRunner().invoke(app, argv).exit_code == 0
    same_files(results, reference / "results")
