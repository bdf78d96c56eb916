"""Faults of the machine, not of the input: a full disk during a checkpoint or an aggregation,
a read-only tracking store, concurrent writers beside each other's temporary files, and a
rerun into a run directory that an earlier run filled. Each ends with a message and leaves
nothing half-visible.

The full disk is a real one: a 1 MiB tmpfs mounted for the test (this needs root, as CI
runs; elsewhere these tests are skipped and say why)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from local_servers import mlflow_server, stop_server
from moebench.cli import app
from moebench.config import RunConfig
from moebench.io import DiskFullError, atomic_path, remove_temporaries, write_text
from moebench.report import paths
from moebench.report.aggregate import aggregate
from moebench.report.summary import find_runs
from moebench.train.checkpoint import CKPT_NAME, save_checkpoint
from moebench.train.loop import Trainer
from test_reliability_inputs import RUN, data_dir, unwritable  # noqa: F401 (fixture)
from test_report import make_study, write_runs


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (a real device that fills up), unmounted afterwards."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def hidden(folder: Path) -> list[str]:
    """Temporary files under `folder` (dot-files, as `moebench.io` names them)."""
    return sorted(p.name for p in folder.rglob(".*") if p.is_file())


def fill(disk: Path) -> None:
    """Leave less than 4 KiB free on `disk`."""
    with contextlib.suppress(OSError), (disk / "filler").open("wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "1m") as disk:
        save_checkpoint(disk, {"step": 1, "w": torch.zeros(1000)})
        before = (disk / CKPT_NAME).read_bytes()
        with pytest.raises(DiskFullError, match=r"no space left on the device of .* last.pt"):
            save_checkpoint(disk, {"step": 2, "w": torch.zeros(1 << 19)})  # 2 MiB
        assert (disk / CKPT_NAME).read_bytes() == before
        assert hidden(disk) == []


def test_full_disk_during_training_ends_with_a_message(
    tmp_path: Path, data_dir: Path  # noqa: F811
) -> None:
    """`moebench train` with its checkpoints on a full device: exit 2, one line naming the
    file and the device, no traceback, no temporary left."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
    with small_disk(tmp_path / "disk", "64k") as disk:
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--out",
                                          str(tmp_path / "out"), "--ckpt-dir", str(disk)])
        assert result.exit_code == 2, result.output
        assert "no space left on the device of" in result.stderr
        assert "last.pt" in result.stderr and "Traceback" not in result.output
        assert hidden(disk) == [] and not (disk / CKPT_NAME).exists()
    assert not (tmp_path / "out" / "summary.json").exists()


def test_full_disk_under_the_run_directory_ends_with_a_message(
    tmp_path: Path, data_dir: Path  # noqa: F811
) -> None:
    """The run directory's device fills while the run writes its config or appends its
    logs: exit 2 naming the device, no traceback, no summary.json, no temporary."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
    with small_disk(tmp_path / "disk", "64k") as disk:
        fill(disk)
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--out",
                                          str(disk / "run"), "--ckpt-dir", str(tmp_path / "ckpt")])
        assert result.exit_code == 2, result.output
        assert f"no space left on the device of {disk / 'run'}" in result.stderr
        assert "Traceback" not in result.output, result.output
        assert not (disk / "run" / "summary.json").exists() and hidden(disk) == []


def test_full_disk_during_aggregation_leaves_no_summary_beside_other_tables(
    tmp_path: Path,
) -> None:
    """An aggregation that fails part-way (here: the disk fills) leaves no summary.parquet:
    summary.parquet is removed first and written last, so tables and figures of two
    aggregations never stand beside a summary as if complete; no temporary is left."""
    runs = find_runs(write_runs(tmp_path / "results"))
    with small_disk(tmp_path / "disk", "32m") as disk:
        aggregate("syn", runs, disk, make_study().report)
        assert paths.summary_file("syn", disk).is_file()
        fill(disk)
        with pytest.raises(DiskFullError, match="no space left on the device of"):
            aggregate("syn", runs, disk, make_study().report)
        assert not paths.summary_file("syn", disk).exists()
        assert hidden(disk) == []


def test_aggregate_command_reports_a_full_disk(tmp_path: Path) -> None:
    results = write_runs(tmp_path / "results")
    study = tmp_path / "syn.yaml"
    study.write_text(yaml.safe_dump(make_study().to_dict()))
    with small_disk(results / "tables", "64k"):
        fill(results / "tables")
        result = CliRunner().invoke(app, ["aggregate", "--results", str(results),
                                          "--study", str(study)])
        assert result.exit_code == 2, result.output
        assert "no space left on the device of" in result.stderr
        assert "Traceback" not in result.output, result.output
        assert not paths.summary_file("syn", results).exists()
        assert hidden(results / "tables") == []


def test_a_live_writers_temporary_survives_another_writers_clean_up(tmp_path: Path) -> None:
    """Two writers of one file: the clean-up of one (before it rewrites) deletes the
    temporary a dead writer left, never the one a live writer is filling."""
    target = tmp_path / "comm.json"
    dead = tmp_path / ".comm.json.killed.tmp"
    dead.write_text("left by a kill")
    with atomic_path(target) as live:
        live.write_text("being written")
        remove_temporaries(tmp_path, ["comm.json"])
        assert live.exists() and not dead.exists()
    assert target.read_text() == "being written"
    assert hidden(tmp_path) == []


def test_concurrent_processes_writing_one_file_all_succeed(tmp_path: Path) -> None:
    """Eight processes, each cleaning up and then writing the same file 30 times: none fails
    on a temporary another deleted, and the file ends whole."""
    script = (
        "import sys; from pathlib import Path; "
        "from moebench.io import remove_temporaries, write_text; "
        "out = Path(sys.argv[1]); "
        "[(remove_temporaries(out.parent, [out.name]), write_text(out, sys.argv[2] * 5000)) "
        "for _ in range(30)]"
    )
    target = tmp_path / "summary.json"
    src = str(Path(__file__).parents[1] / "src")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(target), str(i)],
                              stderr=subprocess.PIPE, env=env)
             for i in range(8)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errors
    text = target.read_text()
    assert len(text) == 5000 and len(set(text)) == 1
    assert hidden(tmp_path) == []


def test_read_only_tracking_store_is_refused_before_any_work(
    tmp_path: Path, data_dir: Path  # noqa: F811
) -> None:
    store = tmp_path / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    write_text(store / "placeholder", "")  # the folder exists; the database is made below
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # a real, empty store
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
    with unwritable(store):
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--out",
                                          str(tmp_path / "out"), "--ckpt-dir",
                                          str(tmp_path / "ckpt"), "--set", f"tracking.uri={uri}"])
    assert result.exit_code == 2, result.output
    assert f"tracking.uri='{uri}'" in result.stderr and "is read-only" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_a_rerun_clears_the_earlier_runs_files_first(
    tmp_path: Path, data_dir: Path  # noqa: F811
) -> None:
    """Files of an earlier run in the directory (here its comm.json and a summary) are gone
    when the new run starts; what stands there at the end is this run's alone, and without
    comm.json aggregation calls the run unfinished instead of reading the old numbers."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("comm.json", "comm.parquet", "summary.json"):
        (out / name).write_text("of an earlier run")
    cfg = RunConfig.model_validate(RUN | {"data_dir": str(data_dir)})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out),
                                      "--ckpt-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert not (out / "comm.json").exists() and not (out / "comm.parquet").exists()
    assert "earlier" not in (out / "summary.json").read_text()


TRACKED_STEP = 3
"""The store fails after this optimizer step; metrics are logged every 2 steps, so the
failed call is the logging of step 4."""


@pytest.fixture(scope="module")
def untracked_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:  # noqa: F811
    """RUN trained without MLflow: the run directory a run with a failing store must match."""
    out = tmp_path_factory.mktemp("untracked") / "run"
    config = out.parent / "run.yaml"
    config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out),
                                      "--ckpt-dir", str(out.parent / "ckpt")])
    assert result.exit_code == 0, result.output
    return out


@contextlib.contextmanager
def frozen(*paths_: Path) -> Iterator[None]:
    """`paths_` (files and folders) made unwritable, also for root: `chattr +i`."""
    for path in paths_:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        for path in paths_:
            subprocess.run(["chattr", "-i", str(path)], check=True)


STORE_FAULTS = ("read_only", "garbage", "deleted", "server_stopped")


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=[pytest.mark.mlflow_server] if f == "server_stopped" else [])
              for f in STORE_FAULTS]
)
def test_a_tracking_store_failing_mid_run_lets_the_run_finish(
    fault: str, tmp_path: Path, data_dir: Path, untracked_run: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store breaks between two optimizer steps (made immutable, overwritten with
    garbage, deleted, or its server stopped): the run ends with exit 0, one warning naming
    the store and the failed call, and the same run directory as a run without MLflow."""
    if fault == "read_only" and (os.geteuid() != 0 or shutil.which("chattr") is None):
        pytest.skip("needs root and `chattr` (root ignores permission bits)")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no minutes of retries
    store = tmp_path / "store"
    store.mkdir()
    db = store / "mlflow.db"
    with contextlib.ExitStack() as stack:
        if fault == "server_stopped":
            uri, server = stack.enter_context(mlflow_server(db, store / "artifacts"))
        else:
            uri = f"sqlite:///{db}"
        breaks = {
            "read_only": lambda: stack.enter_context(frozen(db, store)),
            "garbage": lambda: db.write_bytes(b"not a database\n" * 4096),
            "deleted": lambda: shutil.rmtree(store),
            "server_stopped": lambda: stop_server(server),
        }
        step = Trainer.train_step

        def step_then_break(self: Trainer) -> dict[str, Any]:
            record = step(self)
            if self.step == TRACKED_STEP:
                breaks[fault]()
            return record

        monkeypatch.setattr(Trainer, "train_step", step_then_break)
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
        out = tmp_path / "run"
        result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out),
                                          "--ckpt-dir", str(tmp_path / "ckpt"),
                                          "--set", f"tracking.uri={uri}"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output, result.output
    (warning,) = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert f"MLflow tracking store {uri!r} failed while logging the metrics of step 4" in warning
    assert "the run continues" in warning
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in untracked_run.iterdir())
    for name in ("metrics.jsonl", "routing_trace.parquet", "config.resolved.yaml"):
        mine, theirs = (out / name).read_bytes(), (untracked_run / name).read_bytes()
        if name == "config.resolved.yaml":  # it records the tracking URI, nothing else differs
            mine = mine.replace(f"uri: {uri}".encode(), b"uri: null")
        assert mine == theirs, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss"] == json.loads((untracked_run / "summary.json").read_text())[
        "val_loss"]
