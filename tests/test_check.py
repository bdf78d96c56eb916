"""`moebench reference` and `moebench check` on synthetic study outputs: identical run bytes
where the machine signature matches the reference's, else every mean inside its 95% CI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import StudyConfig
from moebench.io import write_json
from moebench.report import paths
from moebench.report.aggregate import aggregate
from moebench.report.check import check, machine_signature, write_reference
from moebench.report.summary import find_runs
from test_report import STRATEGIES, make_study, write_runs


@pytest.fixture
def done(tmp_path: Path) -> tuple[StudyConfig, Path, Path]:
    """A finished synthetic study under out/ and its reference written from it."""
    study, out = make_study(), tmp_path / "out"
    write_runs(out)
    for d, s, n in study.grid():
        run = paths.run_dir(study.study, d, s, n, out)
        (run / "routing_trace.parquet").write_bytes(f"trace {s} {n}".encode())
        (run / "comm.parquet").write_bytes(b"comm")
        (run / "timing.jsonl").write_text('{"step_s": 0.1}\n')
    aggregate(study.study, find_runs(out), out)
    ref = tmp_path / "ref"
    write_reference(study, out, ref)
    return study, out, ref


def verdicts_of(study: StudyConfig, out: Path, ref: Path) -> tuple[dict[str, str], str]:
    """Strategy -> verdict line detail (prefixed FAIL when it fails), and the headline."""
    verdicts, headline = check(study, out, ref)
    return {v.strategy: ("" if v.ok else "FAIL ") + v.detail for v in verdicts}, headline


def test_reference_holds_run_files_tables_and_this_machine(
    done: tuple[StudyConfig, Path, Path],
) -> None:
    study, out, ref = done
    assert not list(ref.rglob("timing.jsonl")) and len(list(ref.rglob("metrics.jsonl"))) == 9
    for suffix in ("md", "csv", "parquet"):
        mine, theirs = (paths.table_file("syn", suffix, r).read_bytes() for r in (out, ref))
        assert mine == theirs
    assert all(paths.figure_file("syn", "shakespeare", f, ref).is_file() for f in paths.FIGURES)
    signature = json.loads(paths.machine_file("syn", ref).read_text())
    assert signature == machine_signature(study.resources.train.threads)
    assert signature["train_threads"] == 1 and "ATEN_CPU_CAPABILITY" in signature["settings"]


def test_same_signature_needs_identical_bytes(done: tuple[StudyConfig, Path, Path]) -> None:
    study, out, ref = done
    verdicts, headline = verdicts_of(study, out, ref)
    assert headline.startswith("same machine signature")
    assert verdicts == dict.fromkeys(STRATEGIES, "identical bytes")
    metrics = paths.run_dir("syn", "shakespeare", "aux_free", 1, out) / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\n")
    verdicts, _ = verdicts_of(study, out, ref)
    assert verdicts["aux_free"] == "FAIL bytes differ: seed~1/metrics.jsonl"
    assert verdicts["aux_loss"] == verdicts["node_limited"] == "identical bytes"


def test_other_machine_needs_each_mean_inside_the_reference_ci(
    done: tuple[StudyConfig, Path, Path],
) -> None:
    study, out, ref = done
    signature = json.loads(paths.machine_file("syn", ref).read_text())
    write_json(paths.machine_file("syn", ref), signature | {"cpu": "Other CPU"})
    metrics = paths.run_dir("syn", "shakespeare", "aux_free", 1, out) / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\n")  # bytes may differ on another machine
    verdicts, headline = verdicts_of(study, out, ref)
    assert "cpu (" in headline and "Other CPU" in headline and "inside the reference" in headline
    assert verdicts == dict.fromkeys(STRATEGIES, "every mean inside the reference 95% CI")
    # aux_loss val_loss 3.0, 3.1, 3.2: mean 3.1, CI t(0.975, 2) * 0.1 / sqrt(3) = 0.2484.
    table = paths.table_file("syn", "csv", ref)
    df = pd.read_csv(table)
    row = df["strategy"] == "aux_loss"
    assert df.loc[row, "val_loss_ci95"].item() == pytest.approx(0.248414, abs=1e-6)
    for ref_mean, inside in ((3.348, True), (3.35, False), (2.85, False)):
        df.loc[row, "val_loss_mean"] = ref_mean
        df.to_csv(table, index=False)
        verdicts, _ = verdicts_of(study, out, ref)
        expected = (
            "every mean inside the reference 95% CI"
            if inside
            else f"FAIL outside the reference 95% CI: val_loss 3.1 vs {ref_mean:.4g} +- 0.248"
        )
        assert verdicts["aux_loss"] == expected
        assert verdicts["aux_free"] == "every mean inside the reference 95% CI"


def test_check_command_exit_codes(done: tuple[StudyConfig, Path, Path], tmp_path: Path) -> None:
    study, out, ref = done
    study_file = tmp_path / "syn.yaml"
    study_file.write_text(yaml.safe_dump(study.to_dict()))
    argv = ["check", "--study", str(study_file), "--results", str(out), "--reference", str(ref)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("study 'syn' vs its reference: same machine signature")
    expected = [f"ok   shakespeare/{s}: identical bytes" for s in sorted(STRATEGIES)]
    assert sorted(lines[1:]) == expected
    metrics = paths.run_dir("syn", "shakespeare", "node_limited", 0, out) / "metrics.jsonl"
    metrics.write_bytes(b"")
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1
    assert "FAIL shakespeare/node_limited: bytes differ: seed~0/metrics.jsonl" in res.output
    argv[-1] = str(tmp_path / "nowhere")
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2
    assert f"reference signature {paths.machine_file('syn', tmp_path / 'nowhere')}" in res.output
