"""A study's outputs against its committed reference: byte-identical runs where the machine
signature matches the reference's, else every table mean inside the reference's 95% CI.
Also writes a reference from a finished study (`moebench reference`)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

from moebench.config import StudyConfig
from moebench.io import write_json
from moebench.report import paths

BITWISE_FILES = ("metrics.jsonl", "routing_trace.parquet")
"""Run files without wall-clock content: identical bytes on the same machine signature."""

REFERENCE_RUN_FILES = tuple(f for f in paths.RUN_FILES if f != "timing.jsonl")
"""What a reference keeps of each run (timings describe the machine, not the result)."""

SETTINGS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that change CPU kernels or their reduction order."""

KEY = ("dataset", "strategy")

TOLERANCE = 1e-5
"""Relative slack for the CSV's 6 significant digits when comparing a mean with a CI."""


def machine_signature(threads: int) -> dict[str, Any]:
    """CPU model and flags, library versions, training threads and kernel settings: what
    decides the bytes of a CPU training run."""
    import torch

    cpu = {"model name": platform.machine(), "flags": ""}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in cpu and value:
                cpu[key.strip()] = value.strip()
            if all(cpu.values()) and cpu["flags"]:
                break
    return {
        "cpu": cpu["model name"],
        "cpu_flags": sorted(cpu["flags"].split()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {p: version(p) for p in ("torch", "numpy", "tokenizers")},
        "train_threads": threads,
        "settings": {k: os.environ.get(k) for k in SETTINGS},
    }


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The signature fields where `mine` and `theirs` differ (CPU flags summarised)."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        if key == "cpu_flags":
            extra, missing = (
                sorted(set(a or []) - set(b or [])),
                sorted(set(b or []) - set(a or [])),
            )
            out.append(
                f"cpu_flags (+{len(extra)} -{len(missing)}: {' '.join((extra + missing)[:6])})"
            )
        else:
            out.append(f"{key} ({a} vs {b})")
    return out


@dataclass(frozen=True)
class Verdict:
    """The check of one (dataset, strategy) of a study."""

    dataset: str
    strategy: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.dataset}/{self.strategy}: {self.detail}"


def _ci_misses(mine: pd.Series, ref: pd.Series) -> list[str]:
    """Metrics whose mean in `mine` lies outside the reference's mean +- 95% CI."""
    misses = []
    for col in ref.index:
        if not col.endswith("_mean"):
            continue
        name = col.removesuffix("_mean")
        mean, ref_mean, ci = float(mine[col]), float(ref[col]), float(ref[f"{name}_ci95"])
        if abs(mean - ref_mean) > ci + TOLERANCE * max(abs(ref_mean), 1.0):
            misses.append(f"{name} {mean:.4g} vs {ref_mean:.4g} +- {ci:.3g}")
    return misses


def _differing_files(
    study: str, dataset: str, strategy: str, seeds: list[int], out: Path, reference: Path
) -> list[str]:
    """Run files of (dataset, strategy) whose bytes differ from (or are missing in) the
    reference's, as `seed~<n>/<file>`."""
    found = []
    for seed in seeds:
        mine, ref = (paths.run_dir(study, dataset, strategy, seed, r) for r in (out, reference))
        for name in BITWISE_FILES:
            a, b = mine / name, ref / name
            if not (a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()):
                found.append(f"{paths.SEED_PREFIX}{seed}/{name}")
    return found


def check(study: StudyConfig, out: Path, reference: Path) -> tuple[list[Verdict], str]:
    """One verdict per (dataset, strategy) of `study`, comparing its outputs under `out` with
    `reference`; and the headline saying which comparison applies and why."""
    name = study.study
    ref_sig_file, ref_table = (
        paths.machine_file(name, reference),
        paths.table_file(name, "csv", reference),
    )
    my_table = paths.table_file(name, "csv", out)
    for f, what in (
        (ref_sig_file, "reference signature"),
        (ref_table, "reference table"),
        (my_table, "table (run the study first)"),
        (paths.summary_file(name, out), "summary (an aggregation cut short leaves none: rerun)"),
    ):
        if not f.is_file():
            raise ValueError(f"{what} {f} is missing")
    diffs = differences(
        machine_signature(study.resources.train.threads), json.loads(ref_sig_file.read_text())
    )
    mine, ref = (pd.read_csv(f).set_index(list(KEY)) for f in (my_table, ref_table))
    verdicts = []
    for dataset, strategy in ref.index:
        if (dataset, strategy) not in mine.index:
            verdicts.append(Verdict(dataset, strategy, False, "missing from this run's table"))
        elif not diffs:
            bad = _differing_files(name, dataset, strategy, sorted(study.seeds), out, reference)
            detail = f"bytes differ: {', '.join(bad)}" if bad else "identical bytes"
            verdicts.append(Verdict(dataset, strategy, not bad, detail))
        else:
            misses = _ci_misses(mine.loc[(dataset, strategy)], ref.loc[(dataset, strategy)])
            detail = (
                f"outside the reference 95% CI: {'; '.join(misses)}"
                if misses
                else "every mean inside the reference 95% CI"
            )
            verdicts.append(Verdict(dataset, strategy, not misses, detail))
    headline = (
        "same machine signature as the reference: runs must match byte for byte"
        if not diffs
        else f"machine signature differs from the reference ({'; '.join(diffs)}): "
        "means must lie inside the reference 95% CIs"
    )
    return verdicts, headline


def write_reference(study: StudyConfig, out: Path, reference: Path) -> list[Path]:
    """Copy the study's run files (no timings, no checkpoints), tables and figures from `out`
    into a fresh `reference`, with this machine's signature; return the files written."""
    from moebench.report.figures import figure_paths

    name = study.study
    files = [
        paths.run_dir(name, d, s, n, out) / f
        for d, s, n in study.grid()
        for f in REFERENCE_RUN_FILES
    ]
    files += [paths.table_file(name, suffix, out) for suffix in ("md", "html", "csv", "parquet")]
    files += [paths.paired_file(name, out), paths.claims_file(name, out)]
    figures = {
        fig: [f for d in study.datasets for f in figure_paths(paths.figure_file(name, d, fig, out))]
        for fig in (*paths.FIGURES, *paths.OPTIONAL_FIGURES)
    }
    files += [f for fig in paths.FIGURES for f in figures[fig]]
    missing = [str(f) for f in files if not f.is_file()]
    files += [f for fig in paths.OPTIONAL_FIGURES for f in figures[fig] if f.is_file()]
    if missing:
        raise ValueError(f"study {name!r} is not finished under {out}: missing {missing[:3]}")
    if reference.exists():
        shutil.rmtree(reference)
    written = []
    for f in files:
        dest = reference / f.relative_to(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
        written.append(dest)
    write_json(
        paths.machine_file(name, reference), machine_signature(study.resources.train.threads)
    )
    return [*written, paths.machine_file(name, reference)]
