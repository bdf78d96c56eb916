"""Fuzzing the inputs a user or an earlier stage hands over: run configs and routing traces.

Random mutations of a valid config or trace must end in one of two ways: accepted with only
valid values, or refused with a ValueError that names what is wrong (the CLI turns it into
exit 2). Never a traceback of another kind, never a silently accepted bad value, and never a
message that grows with the input (a YAML alias bomb is refused without being expanded).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebench.comm.replay import read_trace
from moebench.config import RunConfig, load_run_config
from moebench.train.trace import trace_table

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""No deadline: the project asserts no timings; a hang would show as the test's timeout."""

VALID = RunConfig().model_dump(mode="json")
"""Every field of a run config at its default (router.normalize resolved): all leaves set."""

MAX_MESSAGE = 4000
"""A refusal names fields and short values: far below this however large the input."""


def leaves(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every non-mapping value of `tree`."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += leaves(value, f"{path}.") if isinstance(value, dict) else [(path, value)]
    return out


LEAVES = leaves(VALID)
BAD = [True, False, math.nan, math.inf, -math.inf, 10**30, -(10**30), [1], {"x": 1}, "1.5x"]
"""Values no run-config field accepts (booleans only where the field is not a bool; strings
only where it is a number)."""


def with_leaf(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with the leaf at `path` set to `value`."""
    head, _, rest = path.partition(".")
    return tree | {head: with_leaf(tree[head], rest, value) if rest else value}


def refusal(text: str) -> str | None:
    """Load `text` as a run config file: None if accepted, else the ValueError's message."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(text)
        try:
            load_run_config(path)
        except ValueError as err:
            assert len(str(err)) < MAX_MESSAGE, str(err)[:500]
            return str(err)
    return None


@FUZZ
@given(leaf=st.sampled_from(LEAVES), bad=st.sampled_from(BAD))
def test_a_bad_value_in_any_field_is_refused_by_name(leaf: tuple[str, Any], bad: Any) -> None:
    path, original = leaf
    if isinstance(bad, bool) and (isinstance(original, bool) or path == "router.normalize"):
        return  # a bool is a valid value there
    if isinstance(bad, str) and not isinstance(original, int | float):
        return  # a string may be a valid name or path
    message = refusal(yaml.safe_dump(with_leaf(VALID, path, bad)))
    assert message is not None, f"{path}={bad!r} was accepted"
    assert path in message, (path, message)


@FUZZ
@given(data=st.data())
def test_random_edits_of_a_config_file_never_crash(data: st.DataObject) -> None:
    """Characters inserted, deleted or replaced anywhere in a valid config file: accepted or
    refused with a ValueError, nothing else (a `yaml`, pydantic or Python error escaping would
    fail here)."""
    text = yaml.safe_dump(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 3))
        insert = data.draw(st.text(alphabet=":{}[]&*!-?,'\"#|>% \n\t.e0123456789yn~x", max_size=4))
        text = text[:at] + insert + text[at + cut:]
    refusal(text)


def test_alias_bomb_is_refused_without_expanding_it() -> None:
    """A billion laughs under a known key: the message shows a shortened value, not 9**9."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
        for i in range(8)
    )
    message = refusal(bomb + "train: {steps: *i, lr: *i}\n")
    assert message is not None and "train.steps" in message and "train.lr" in message


# --- routing traces ---------------------------------------------------------------------------

E, K, T, L = 8, 2, 16, 2
"""Trace shape of the fuzzed traces: experts, slots, tokens, MoE layers."""
SIZES = {"layer": L, "token": T, "slot": K, "expert": E}


def valid_trace() -> pa.Table:
    cfg = RunConfig.model_validate(
        {"router": {"num_experts": E, "top_k": K}, "topology": {"num_nodes": 2, "gpus_per_node": 2}}
    )
    gen = torch.Generator().manual_seed(0)
    experts_LTK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(L * T)])
    experts_LTK = experts_LTK.reshape(L, T, K)
    return trace_table(experts_LTK, torch.full(experts_LTK.shape, 0.5), cfg, seq_len=T)


TRACE = valid_trace()


def read(table: pa.Table) -> str | None:
    """`read_trace` of `table` written to a file: None if accepted, else the message."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "routing_trace.parquet"
        pq.write_table(table, path)
        try:
            read_trace(path)
        except ValueError as err:
            assert len(str(err)) < MAX_MESSAGE
            return str(err)
    return None


@FUZZ
@given(column=st.sampled_from(sorted(SIZES)), row=st.integers(0, L * T * K - 1),
       value=st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 20))
def test_a_changed_id_in_a_trace_is_refused_unless_it_stays_valid(
    column: str, row: int, value: int
) -> None:
    """One id of a trace set to `value` (int64): an expert id in 0..E-1 is a valid routing and
    is accepted; anything else (an id out of range, a (layer, token, slot) given twice) is
    refused naming the file."""
    values = TRACE.column(column).to_numpy().astype(np.int64)
    original = int(values[row])
    values[row] = value
    table = TRACE.set_column(TRACE.column_names.index(column), column, pa.array(values))
    message = read(table)
    valid = value == original or (column == "expert" and 0 <= value < E)
    assert (message is None) == valid, (column, value, message)
    if message is not None:
        assert "trace=" in message and "routing_trace.parquet" in message


@FUZZ
@given(column=st.sampled_from(sorted(SIZES)), row=st.integers(0, L * T * K - 1),
       value=st.sampled_from([math.nan, math.inf, 2.5, None, -0.5]))
def test_a_non_integer_id_in_a_trace_is_refused(column: str, row: int, value: Any) -> None:
    values: list[Any] = TRACE.column(column).to_pylist()
    values[row] = value
    table = TRACE.set_column(TRACE.column_names.index(column), column, pa.array(values))
    message = read(table)
    assert message is not None and f"column {column!r} has type" in message


@FUZZ
@given(key=st.sampled_from(["num_experts", "top_k", "num_layers", "num_tokens", "num_nodes"]),
       value=st.sampled_from([None, True, -1, 2.5, "8", [8], math.nan]))
def test_odd_trace_metadata_is_refused(key: str, value: Any) -> None:
    meta = json.loads(TRACE.schema.metadata[b"moebench"])
    meta = {k: v for k, v in (meta | {key: value}).items() if v is not None}
    message = read(TRACE.replace_schema_metadata({b"moebench": json.dumps(meta)}))
    assert message is not None and "invalid metadata" in message and key in message


@pytest.mark.parametrize("command", [
    "from moebench.train.tracking import Tracker",
    "import moebench, mlflow",
])
def test_mlflow_telemetry_is_off_wherever_moebench_starts_mlflow(command: str) -> None:
    """Without any telemetry setting in the environment, MLflow imported through moebench
    reports telemetry as disabled (no usage data leaves the machine)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    proc = subprocess.run(
        [sys.executable, "-c", f"{command}\nfrom mlflow.telemetry.utils import "
         "is_telemetry_disabled\nprint(is_telemetry_disabled())"],
        capture_output=True, text=True, env=env, check=True,
    )
    assert proc.stdout.strip() == "True"


# --- run directories at aggregation ---------------------------------------------------------

RUN_VALUES = [None, True, "x", -1, 1.5, math.nan, [], {}, [[1.0]], 10**30]
"""Values a mutated record field may take: wrong types, nulls, out-of-range numbers."""


@pytest.fixture(scope="module")
def valid_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic run directories of one study (test_report's), valid as written."""
    from test_report import write_runs

    return write_runs(tmp_path_factory.mktemp("fuzz_runs"))


@FUZZ
@given(data=st.data())
def test_a_mutated_run_record_is_refused_by_name_or_read_validly(
    valid_runs: Path, data: st.DataObject
) -> None:
    """A field of summary.json or comm.json removed or replaced, or a metrics.jsonl line
    mangled: aggregation's reader (`collect`, then the curves) either reads valid rows or
    raises a ValueError naming the file; never another exception."""
    from moebench.report.summary import collect, find_runs, load_curves

    runs = find_runs(valid_runs)
    run = data.draw(st.sampled_from(runs))
    name = data.draw(st.sampled_from(["summary.json", "comm.json", "metrics.jsonl"]))
    path = run / name
    original = path.read_bytes()
    try:
        if name == "metrics.jsonl":
            lines = original.decode().splitlines()
            i = data.draw(st.integers(0, len(lines) - 1))
            record = json.loads(lines[i])
            key = data.draw(st.sampled_from(sorted(record)))
            record[key] = data.draw(st.sampled_from(RUN_VALUES))
            lines[i] = json.dumps(record)
            path.write_text("\n".join(lines) + "\n")
        else:
            record = json.loads(original)
            key = data.draw(st.sampled_from(sorted(record)))
            if data.draw(st.booleans()):
                del record[key]
            else:
                record[key] = data.draw(st.sampled_from(RUN_VALUES))
            path.write_text(json.dumps(record))
        try:
            df = collect(runs)
            curves = load_curves(runs)
        except ValueError as err:
            assert str(run) in str(err) or "summary table fails its schema" in str(err)
            assert len(str(err)) < MAX_MESSAGE
        else:
            assert df["val_loss"].notna().all() and len(curves) > 0
    finally:
        path.write_bytes(original)
