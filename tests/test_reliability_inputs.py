"""The bad-input catalog: every mistake a user can make with `moebench data`, `moebench train`
and `moebench resolve` is refused before any work, through the CLI the user runs, with exit
code 2 and a message naming the field, the value and the allowed values (or the fix), and
with nothing written: the working directory holds exactly the files it held before.

Each case is one row of the README's troubleshooting table (TROUBLESHOOTING.md.part). The
study-level, pipeline, comm and aggregation inputs are covered in test_reliability_snakemake
(Snakemake) and beside the kill tests; NaN router logits at the end of this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from local_servers import free_port
from moebench.cli import app
from moebench.config import DataConfig, RunConfig
from moebench.data import prepare as prepare_data
from moebench.model import MoELayer
from moebench.train.checkpoint import CKPT_NAME
from moebench.train.trace import write_trace

DATA = DataConfig(source="synthetic", vocab_size=300, synthetic_docs=40, synthetic_doc_tokens=128)
"""Tiny synthetic corpus: 4644 train and 516 validation tokens."""

RUN = {
    "study": "rel",
    "dataset": "syn",
    "strategy": "aux_free",
    "data": DATA.model_dump(mode="json"),
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_dense_layers": 1,
              "dense_hidden": 64, "n_shared_experts": 1, "expert_hidden": 16},
    "topology": {"num_nodes": 4, "gpus_per_node": 2},
    "router": {"num_experts": 16, "top_k": 4, "group_limit": 2, "score_fn": "sigmoid",
               "normalize": True},
    "balance": {"bias": {"enabled": True, "rate": 0.01}},
    "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_every": 4,
              "eval_batches": 2, "log_every": 2, "ckpt_every": 2, "trace_tokens": 64},
}
"""A run config of the default study's topology (16 experts, 8 devices in 4 nodes, top-4)."""


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reliability_data") / "syn"
    prepare_data(DATA, out, seed=0)
    return out


@pytest.fixture(scope="session")
def trace(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A valid routing trace of RUN's shape (1 MoE layer, 64 tokens, top-4), as `moebench
    train` writes it; the routing itself is random (the comm stage only counts it)."""
    cfg = RunConfig.model_validate(RUN | {"data_dir": str(data_dir)})
    gen = torch.Generator().manual_seed(0)
    experts_LTK = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(64)])[None]
    path = tmp_path_factory.mktemp("reliability_trace") / "routing_trace.parquet"
    write_trace(path, experts_LTK, torch.full(experts_LTK.shape, 0.25), cfg, seq_len=32)
    return path


@dataclass
class Ctx:
    """What a case builds its command from: a scratch folder (the working directory) holding
    run.yaml (a valid run config on `data`), the prepared data, a routing trace and the
    output paths."""

    root: Path
    data: Path
    trace: Path

    @property
    def config(self) -> Path:
        return self.root / "run.yaml"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt"

    def train(self, *args: str) -> list[str]:
        return ["train", "--config", str(self.config), "--out", str(self.out),
                "--ckpt-dir", str(self.ckpt), *args]

    def data_cmd(self, *args: str) -> list[str]:
        return ["data", "--out", str(self.out), "--set", "data.source=synthetic", *args]

    def text_source(self, name: str, content: bytes | None) -> list[str]:
        """`moebench data` on a local text file `name` holding `content` (None: no file)."""
        path = self.root / name
        if content is not None:
            path.write_bytes(content)
        return self.data_cmd(*sets("data.source=file", f"data.path={path}"))

    def comm(self, *args: str, trace: Path | None = None) -> list[str]:
        return ["comm", "--trace", str(trace or self.trace), "--out", str(self.out), *args]

    def replay(self, *args: str) -> list[str]:
        """`moebench comm-replay` on a small topology (2 nodes x 2 GPUs, 16 experts)."""
        return ["comm-replay", "--output", str(self.out / "replay.parquet"), "--nodes", "2",
                "--gpus-per-node", "2", "--experts", "16", "--top-k", "2", "--group-limit", "1",
                "--tokens-per-gpu", "16", "--bias-steps", "1", *args]

    def damaged_trace(self, damage: Callable[[pa.Table], pa.Table | bytes]) -> Path:
        """A copy of the trace rewritten by `damage` (a table, or raw bytes)."""
        damaged = damage(pq.read_table(self.trace))
        path = self.root / "trace.parquet"
        if isinstance(damaged, bytes):
            return _write(path, damaged)
        pq.write_table(damaged, path)
        return path

    def run_dir(self, files: dict[str, bytes]) -> Path:
        """results/runs/rel/syn/aux_free/seed~0 holding `files` (name -> content)."""
        run = self.root / "results" / "runs" / "rel" / "syn" / "aux_free" / "seed~0"
        run.mkdir(parents=True)
        for name, content in files.items():
            _write(run / name, content)
        return run

    def run_with(self, **files: bytes) -> Path:
        """The results root of one run directory holding a valid config.resolved.yaml, an
        empty metrics.jsonl and `{}` summary and comm files, with `files` replacing them."""
        cfg = RunConfig.model_validate(RUN | {"data_dir": str(self.data)})
        valid = {"config.resolved.yaml": yaml.safe_dump(cfg.model_dump(mode="json")).encode(),
                 "metrics.jsonl": b"", "summary.json": b"{}", "comm.json": b"{}"}
        return self.run_dir({k.replace("_", "."): v for k, v in (valid | files).items()}
                            ).parents[4]

    def damaged_data(self, damage: Callable[[Path], None]) -> str:
        """A copy of the prepared data with `damage` applied; returns `--set data_dir=...`."""
        copy = self.root / "damaged"
        shutil.copytree(self.data, copy)
        damage(copy)
        return f"data_dir={copy}"

    def study(self, extra: dict | None = None) -> Path:
        """A valid two-strategy study file (plus `extra` keys merged into it)."""
        study = {
            "study": "rel",
            "seeds": [0, 1],
            "datasets": {"syn": DATA.model_dump(mode="json")},
            "strategies": {"aux_loss": {"balance": {"switch_alpha": 0.01}}, "none": {}},
        } | (extra or {})
        path = self.root / "study.yaml"
        path.write_text(yaml.safe_dump(study))
        return path

    def aggregate(self, results: Path) -> list[str]:
        """`moebench aggregate` of study `rel` (one run: syn/aux_free/seed~0) over `results`."""
        return ["aggregate", "--results", str(results), "--study", str(rel_study(self.root))]

    def resolve(self, *args: str, study: dict | None = None) -> list[str]:
        return ["resolve", "--study", str(self.study(study)), "--dataset", "syn",
                "--output", str(self.out / "run.yaml"), *args]


ALIAS_BOMB = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"%c: &%c [%s]\n" % (98 + i, 98 + i, b", ".join([b"*%c" % (97 + i)] * 9)) for i in range(8)
) + b"train: {steps: *i}\n"
"""A billion laughs: 9**9 leaves once expanded; read and refused without expanding it."""


def rel_study(folder: Path) -> Path:
    """The study file of the one run `rel/syn/aux_free/seed~0`, MLflow off."""
    path = folder / "rel.yaml"
    study = {"study": "rel", "seeds": [0], "datasets": {"syn": DATA.model_dump(mode="json")},
             "strategies": {"aux_free": {}}, "tracking": {"uri": None}}
    path.write_text(yaml.safe_dump(study))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_expert(table: pa.Table, expert: pa.Array) -> pa.Table:
    """`table` with its expert column replaced (metadata kept)."""
    return table.set_column(table.column_names.index("expert"), "expert", expert)


def _with_meta(table: pa.Table, **changes: object) -> pa.Table:
    """`table` with metadata keys changed (None: removed)."""
    meta = json.loads(table.schema.metadata[b"moebench"])
    meta = {k: v for k, v in (meta | changes).items() if v is not None}
    return table.replace_schema_metadata({b"moebench": json.dumps(meta)})


def _truncate(damaged: Path) -> None:
    """train.bin cut to 999 bytes (a copy or a download that stopped)."""
    path = damaged / "train.bin"
    path.write_bytes(path.read_bytes()[:999])


def _broken_checkpoint(ckpt_dir: Path) -> Path:
    """A last.pt cut short (as a disk-full or a copy gone wrong leaves it)."""
    ckpt_dir.mkdir()
    return _write(ckpt_dir / CKPT_NAME, b"PK\x03\x04 half a checkpoint")


def _flip_token(damaged: Path) -> None:
    """One token id changed to another valid id: same size, ids in range, other bytes."""
    tokens = np.fromfile(damaged / "train.bin", dtype="<u2")
    tokens[5] = 7 if tokens[5] != 7 else 8
    tokens.tofile(damaged / "train.bin")


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make `folder` refuse new entries, also for root (who ignores permission bits): the
    immutable attribute there, mode 0555 otherwise."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True, check=False
    ).returncode:
        pytest.skip("running as root and `chattr +i` is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@dataclass(frozen=True)
class Case:
    """One bad input: `argv(ctx)` is the user's command; `expect` are substrings of the
    message (field, value, allowed values or fix)."""

    id: str
    argv: Callable[[Ctx], list[str]]
    expect: tuple[str, ...]


def sets(*settings: str) -> tuple[str, ...]:
    """`--set` options."""
    return tuple(x for s in settings for x in ("--set", s))


CASES = [
    # --- the run config (pydantic, moebench.config) --------------------------------------
    Case("unknown_score_fn", lambda c: c.train(*sets("router.score_fn=softmaxx")),
         ("router.score_fn", "'softmaxx'", "'softmax' or 'sigmoid'")),
    Case("unknown_bias_rule", lambda c: c.train(*sets("balance.bias.rule=linear")),
         ("balance.bias.rule", "'linear'", "'sign', 'proportional' or 'multiplicative'")),
    Case("unknown_limit", lambda c: c.train(*sets("router.limit=rack")),
         ("router.limit", "'rack'", "'none', 'device' or 'node'")),
    Case("unknown_dispatcher", lambda c: c.train(*sets("topology.dispatcher=twostage")),
         ("topology.dispatcher", "'twostage'", "'per_expert' or 'dedup'")),
    Case("padded_a2a_with_dedup",
         lambda c: c.train(*sets("topology.dispatcher=dedup",
                                 "topology.a2a_capacity_factor=2")),
         ("topology.a2a_capacity_factor=2.0", "topology.dispatcher='dedup'",
          "dispatcher='per_expert'")),
    Case("zero_a2a_capacity_factor", lambda c: c.train(*sets("topology.a2a_capacity_factor=0")),
         ("topology.a2a_capacity_factor", "got 0", "greater than 0")),
    Case("top_k_above_experts", lambda c: c.train(*sets("router.top_k=20")),
         ("router.top_k=20", "router.num_experts=16", "allowed: 1..16")),
    Case("group_limit_above_groups",
         lambda c: c.train(*sets("router.limit=node", "router.group_limit=5")),
         ("router.group_limit=5", "4 nodes", "allowed: 1..4")),
    Case("top_k_above_limited_experts",
         lambda c: c.train(*sets("router.limit=device", "router.group_limit=1")),
         ("router.top_k=4", "group_limit x experts per device = 1 x 2 = 2", "allowed: 1..2")),
    Case("experts_not_divisible_by_devices", lambda c: c.train(*sets("router.num_experts=12")),
         ("router.num_experts=12", "topology.num_devices=8", "multiples of 8")),
    Case("experts_not_divisible_by_nodes", lambda c: c.train(*sets("topology.num_nodes=3")),
         ("router.num_experts=16", "topology.num_nodes=3", "multiples of 3")),
    Case("negative_bias_rate", lambda c: c.train(*sets("balance.bias.rate=-0.001")),
         ("balance.bias.rate", "-0.001", "greater than or equal to 0")),
    Case("nan_bias_rate", lambda c: c.train(*sets("balance.bias.rate=.nan")),
         ("balance.bias.rate", "nan", "finite number")),
    Case("negative_alpha", lambda c: c.train(*sets("balance.switch_alpha=-0.01")),
         ("balance.switch_alpha", "-0.01", "greater than or equal to 0")),
    Case("nan_alpha", lambda c: c.train(*sets("balance.seq_alpha=.nan")),
         ("balance.seq_alpha", "nan", "finite number")),
    Case("infinite_alpha", lambda c: c.train(*sets("balance.expert_alpha=.inf")),
         ("balance.expert_alpha", "inf", "finite")),
    Case("zero_capacity_factor", lambda c: c.train(*sets("balance.capacity.factor=0")),
         ("balance.capacity.factor", "got 0", "greater than 0")),
    Case("negative_capacity_factor", lambda c: c.train(*sets("balance.capacity.factor=-1.25")),
         ("balance.capacity.factor", "-1.25", "greater than 0")),
    Case("multiplicative_bias_with_softmax",
         lambda c: c.train(*sets("router.score_fn=softmax", "balance.bias.rule=multiplicative")),
         ("balance.bias.rule='multiplicative'", "router.score_fn='sigmoid'")),
    Case("typo_in_key", lambda c: c.train(*sets("router.topk=4")),
         ("router.topk", "Extra inputs are not permitted", "allowed keys: num_experts, top_k",
          "did you mean 'top_k'?")),
    Case("typo_in_section", lambda c: c.train(*sets("trian.steps=4")),
         ("trian", "allowed keys: study", "did you mean 'train'?")),
    Case("wrong_type", lambda c: c.train(*sets("train.steps=many")),
         ("train.steps", "'many'", "valid integer")),
    Case("fractional_integer", lambda c: c.train(*sets("train.batch_size=2.5")),
         ("train.batch_size", "2.5", "valid integer")),
    Case("zero_steps", lambda c: c.train(*sets("train.steps=0")),
         ("train.steps", "got 0", "greater than or equal to 1")),
    Case("heads_do_not_divide_width", lambda c: c.train(*sets("model.n_heads=3")),
         ("model.d_model=32", "divisible by model.n_heads=3")),
    Case("odd_head_dim", lambda c: c.train(*sets("model.d_model=30")),
         ("model.d_model / model.n_heads = 15", "must be even for RoPE")),
    Case("more_dense_than_layers", lambda c: c.train(*sets("model.n_dense_layers=3")),
         ("model.n_dense_layers=3", "model.n_layers=2")),
    Case("negative_seed", lambda c: c.train(*sets("seed=-1")),
         ("seed", "-1", "greater than or equal to 0")),
    Case("name_with_slash", lambda c: c.train(*sets("strategy=../x")),
         ("strategy", "'../x'", "[A-Za-z0-9_.-]")),
    Case("config_file_missing", lambda c: ["train", "--config", str(c.root / "nope.yaml"),
                                           "--out", str(c.out)],
         ("config file", "nope.yaml", "does not exist")),
    Case("config_not_yaml",
         lambda c: ["train", "--config", str(_write(c.root / "bad.yaml", b"router: {top_k: 4\n")),
                    "--out", str(c.out)],
         ("config file", "bad.yaml", "not valid YAML", "line 2")),
    Case("config_not_a_mapping",
         lambda c: ["train", "--config", str(_write(c.root / "list.yaml", b"- 1\n- 2\n")),
                    "--out", str(c.out)],
         ("config file", "list.yaml", "must hold a mapping", "list")),
    Case("set_without_value", lambda c: c.train("--set", "train.steps"),
         ("--set expects key=value", "'train.steps'")),
    Case("set_value_not_yaml", lambda c: c.train(*sets("train.steps=[4")),
         ("--set 'train.steps=[4'", "not valid YAML")),
    # --- strict types and bounds: YAML surprises are refused, not coerced ---------------
    Case("bool_as_integer", lambda c: c.train(*sets("train.steps=true")),
         ("train.steps", "(got True)", "valid integer")),
    Case("bool_as_number", lambda c: c.train(*sets("train.lr=yes")),
         ("train.lr", "(got True)", "valid number")),
    Case("integer_as_bool", lambda c: c.train(*sets("balance.bias.enabled=1")),
         ("balance.bias.enabled", "(got 1)", "valid boolean")),
    Case("string_as_number", lambda c: c.train(*sets("train.lr='0.1'")),
         ("train.lr", "(got '0.1')", "valid number")),
    Case("float_as_integer", lambda c: c.train(*sets("data.synthetic_topics=1e9")),
         ("data.synthetic_topics", "1000000000.0", "valid integer")),
    Case("huge_route_scale", lambda c: c.train(*sets("router.route_scale=1e30")),
         ("router.route_scale", "1e+30", "less than or equal to 100", "raise it there")),
    Case("huge_topic_count", lambda c: c.data_cmd(*sets("data.synthetic_topics=1000000000")),
         ("data.synthetic_topics", "1000000000", "less than or equal to 4096", "raise it")),
    Case("huge_width", lambda c: c.train(*sets("model.d_model=1000000000")),
         ("model.d_model", "less than or equal to 65536")),
    Case("seed_overflow", lambda c: c.train(*sets(f"seed={2**64}")),
         ("seed", str(2**64), "less than or equal to 2147483646")),
    Case("infinite_lr", lambda c: c.train(*sets("train.lr=.inf")),
         ("train.lr", "inf", "finite number")),
    Case("duplicate_section", lambda c: [
        "train", "--config", str(_write(c.root / "dup.yaml", b"train: {steps: 4}\nseed: 1\n"
                                        b"train: {lr: 0.1}\n")), "--out", str(c.out)],
         ("config file", "dup.yaml", "key 'train' is given twice (lines 1 and 3)")),
    Case("config_empty", lambda c: [
        "train", "--config", str(_write(c.root / "empty.yaml", b"# nothing\n")), "--out",
        str(c.out)],
         ("config file", "empty.yaml is empty", "allowed: a YAML mapping")),
    Case("yaml_alias_bomb", lambda c: [
        "train", "--config", str(_write(c.root / "bomb.yaml", ALIAS_BOMB)), "--out", str(c.out)],
         ("train.steps", "valid integer", "[[...], [...], [...], [...], ...]")),
    # --- the prepared data (moebench.data) ------------------------------------------------
    Case("data_dir_missing", lambda c: c.train(*sets(f"data_dir={c.root / 'nodata'}")),
         ("data_dir=", "nodata", "does not exist", "moebench data --out")),
    Case("data_incomplete", lambda c: c.train(
        *sets(c.damaged_data(lambda d: (d / "manifest.json").unlink()))),
         ("manifest.json is missing", "not a complete data directory", "rerun `moebench data`")),
    Case("manifest_corrupt", lambda c: c.train(
        *sets(c.damaged_data(lambda d: _write(d / "manifest.json", b'{"format": 1')))),
         ("manifest.json is not valid JSON", "rerun `moebench data`")),
    Case("token_file_missing", lambda c: c.train(
        *sets(c.damaged_data(lambda d: (d / "train.bin").unlink()))),
         ("token file", "train.bin is missing", "rerun `moebench data`")),
    Case("token_file_truncated", lambda c: c.train(*sets(c.damaged_data(_truncate))),
         ("train.bin has 999 bytes", "n_tokens=4644 x 2 = 9288", "truncated or corrupt")),
    Case("token_file_bit_flip", lambda c: c.train(*sets(c.damaged_data(_flip_token))),
         ("token file", "train.bin: sha256 differs from the manifest", "rerun `moebench data`")),
    Case("vocab_differs_from_data", lambda c: c.train(*sets("data.vocab_size=512")),
         ("vocab_size=512", "vocab_size=300 of the data", "data.vocab_size=512")),
    Case("data_prepared_with_other_config", lambda c: c.train(*sets("data.synthetic_skew=2.0")),
         ("prepared with another config", "data.synthetic_skew: prepared 1.2, requested 2.0")),
    Case("seq_len_beyond_data", lambda c: c.train(*sets("train.seq_len=600")),
         ("train.seq_len=600", "601 tokens", "'val'", "has 516")),
    # --- the run's surroundings ------------------------------------------------------------
    Case("out_is_a_file", lambda c: ["train", "--config", str(c.config),
                                     "--out", str(_write(c.root / "afile", b"x"))],
         ("afile", "exists and is not a directory")),
    Case("mlflow_not_answering",
         lambda c: c.train(*sets(f"tracking.uri=http://127.0.0.1:{free_port()}")),
         ("tracking.uri='http://127.0.0.1:", "does not answer")),
    Case("batch_cannot_fit_memory", lambda c: c.train(*sets("train.batch_size=1048576")),
         ("train.batch_size=1048576", "training needs at least", "GiB", "lower bound")),
    Case("width_cannot_fit_memory", lambda c: c.train(*sets(
        "model.d_model=65536", "model.expert_hidden=1048576")),
         ("model.d_model=65536", "model.expert_hidden=1048576", "parameters", "GiB")),
    Case("tracking_uri_empty", lambda c: c.train(*sets("tracking.uri=''")),
         ("tracking.uri", "not a supported MLflow store", "(got '')", "or null")),
    Case("tracking_uri_unsupported_scheme", lambda c: c.train(*sets("tracking.uri=ftp://h/x")),
         ("tracking.uri", "not a supported MLflow store", "ftp://h/x", "sqlite:///<file>")),
    Case("tracking_store_garbage", lambda c: c.train(*sets(
        f"tracking.uri=sqlite:///{_write(c.root / 'garbage.db', bytes(range(256)) * 8)}")),
         ("garbage.db", "is not a usable MLflow store", "file is not a database")),
    Case("checkpoint_unreadable", lambda c: c.train() if _broken_checkpoint(c.ckpt) else [],
         ("checkpoint", "last.pt cannot be read", "delete it to restart")),
    # --- moebench data ---------------------------------------------------------------------
    Case("unknown_data_source", lambda c: ["data", "--out", str(c.out), *sets("data.source=wiki")],
         ("data.source", "'wiki'",
          "'shakespeare', 'cpython', 'synthetic', 'file', 'hf' or 'mixed'")),
    Case("file_source_without_path", lambda c: c.data_cmd(*sets("data.source=file")),
         ("data.path is required when data.source='file'",)),
    Case("text_file_missing", lambda c: c.text_source("corpus.txt", None),
         ("data.path=", "corpus.txt", "is not a file or a folder")),
    Case("text_file_empty", lambda c: c.text_source("empty.txt", b" \n\n "),
         ("data.path=", "empty.txt", "holds no text")),
    Case("text_file_not_utf8", lambda c: c.text_source("latin1.txt", "café".encode("latin-1")),
         ("data.path=", "latin1.txt", "is not UTF-8 text")),
    Case("corpus_too_small_to_split",
         lambda c: ["data", "--out", str(c.out), *sets("data.max_bytes=100")],
         ("1 document(s)", "at least 2", "raise data.max_bytes")),
    Case("vocab_too_small", lambda c: c.data_cmd(*sets("data.vocab_size=100")),
         ("data.vocab_size", "100", "greater than or equal to 260")),
    Case("val_fraction_out_of_range", lambda c: c.data_cmd(*sets("data.val_fraction=0.7")),
         ("data.val_fraction", "0.7", "less than 0.5")),
    Case("data_out_is_a_file", lambda c: ["data", "--out", str(_write(c.root / "f", b"")),
                                          *sets("data.source=synthetic")],
         ("out_dir=", "exists and is not a directory")),
    Case("data_out_under_a_file", lambda c: ["data", "--out", str(_write(c.root / "f", b"") / "d"),
                                             *sets("data.source=synthetic")],
         ("out_dir=", "cannot be created", "is not a directory")),
    # --- moebench comm / comm-replay -------------------------------------------------------
    Case("trace_missing", lambda c: c.comm(trace=c.root / "routing_trace.parquet"),
         ("trace=", "routing_trace.parquet does not exist", "allowed: a routing_trace.parquet")),
    Case("trace_truncated", lambda c: c.comm(
        trace=c.damaged_trace(lambda t: c.trace.read_bytes()[:500])),
         ("trace=", "is not a readable Parquet file", "rerun `moebench train`")),
    Case("trace_without_metadata", lambda c: c.comm(
        trace=c.damaged_trace(lambda t: t.replace_schema_metadata({}))),
         ("trace=", "has no schema metadata key b'moebench'",)),
    Case("trace_with_a_hole", lambda c: c.comm(trace=c.damaged_trace(lambda t: t.slice(1))),
         ("trace=", "exactly once", "L=1, T=64, K=4")),
    Case("trace_metadata_not_json", lambda c: c.comm(
        trace=c.damaged_trace(lambda t: t.replace_schema_metadata({b"moebench": b"{"}))),
         ("trace=", "invalid metadata b'moebench'", "rerun `moebench train`")),
    Case("trace_metadata_without_top_k", lambda c: c.comm(
        trace=c.damaged_trace(lambda t: _with_meta(t, top_k=None))),
         ("trace=", "invalid metadata", "top_k: Field required")),
    Case("trace_metadata_bool_size", lambda c: c.comm(
        trace=c.damaged_trace(lambda t: _with_meta(t, num_tokens=True))),
         ("trace=", "num_tokens: Input should be a valid integer", "(got True)")),
    Case("trace_nan_expert", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: _with_expert(t, pa.array([float("nan")] + [1.0] * 255)))),
         ("trace=", "column 'expert' has type double", "allowed: integers without nulls")),
    Case("trace_null_expert", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: _with_expert(t, pa.array([None] + [1] * 255, pa.int16())))),
         ("trace=", "column 'expert' has type int16 with 1 nulls", "allowed: integers")),
    Case("trace_fractional_expert", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: _with_expert(t, pa.array([2.5] * 256)))),
         ("trace=", "column 'expert' has type double", "allowed: integers")),
    Case("trace_expert_out_of_range", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: _with_expert(t, pa.array([16] + [1] * 255, pa.int16())))),
         ("trace=", "column 'expert' holds 1..16", "allowed: 0..15")),
    Case("trace_expert_past_int16", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: _with_expert(t, pa.array([2**40] + [1] * 255, pa.int64())))),
         ("trace=", f"column 'expert' holds 1..{2**40}", "allowed: 0..15")),
    Case("trace_negative_token", lambda c: c.comm(trace=c.damaged_trace(
        lambda t: t.set_column(1, "token", pa.array([-1] * 256, pa.int32())))),
         ("trace=", "column 'token' holds -1..-1", "allowed: 0..63")),
    Case("comm_nodes_not_dividing_experts", lambda c: c.comm("--nodes", "3"),
         ("num_experts=16", "3 x 2 = 6 devices", "allowed: num_experts a multiple of 6")),
    Case("comm_negative_bandwidth", lambda c: c.comm("--ib-gbps", "-50"),
         ("ib_gbps=-50.0", "allowed: a finite number > 0")),
    Case("comm_out_under_a_file", lambda c: [
        "comm", "--trace", str(c.trace), "--out", str(_write(c.root / "f", b"") / "run")],
         ("--out=", "cannot be created", "is not a directory")),
    Case("replay_unknown_strategy", lambda c: c.replay("--strategies", "uniform,aux_free"),
         ("strategies=['aux_free']", "allowed: uniform, unrestricted, device_limited")),
    Case("replay_top_k_above_experts", lambda c: c.replay("--top-k", "20"),
         ("top_k=20", "allowed: 1..16")),
    Case("replay_group_limit_above_groups", lambda c: c.replay("--group-limit", "5"),
         ("group_limit=5", "allowed: 1..")),
    Case("replay_nan_skew", lambda c: c.replay("--skew", "nan"),
         ("skew=nan", "allowed: a finite number >= 0")),
    # --- moebench aggregate -------------------------------------------------------------------
    Case("aggregate_without_runs", lambda c: c.aggregate(c.root / "results"),
         ("unfinished runs of study 'rel'", "seed~0")),
    Case("aggregate_corrupt_summary", lambda c: c.aggregate(
        c.run_with(summary_json=b'{"study": "rel"')),
         ("cannot read", "seed~0/summary.json", "Expecting ',' delimiter")),
    Case("aggregate_run_without_metrics_and_config", lambda c: c.aggregate(
        c.run_dir({"summary.json": b"{}", "comm.json": b"{}"}).parents[4]),
         ("seed~0 lacks config.resolved.yaml, metrics.jsonl", "rerun its train and comm jobs")),
    Case("aggregate_summary_missing_fields", lambda c: c.aggregate(
        c.run_with(summary_json=b'{"study": "rel", "seed": "0"}')),
         ("seed~0/summary.json", "seed: Input should be a valid integer (got '0')",
          "dataset: Field required", "more")),
    Case("aggregate_metrics_record_without_step", lambda c: c.aggregate(
        c.run_with(metrics_jsonl=b'{"kind": "train", "maxvio_batch": 0.5}\n')),
         ("seed~0/metrics.jsonl, line 1", "step: Field required")),
    Case("aggregate_config_resolved_invalid", lambda c: c.aggregate(
        c.run_with(config_resolved_yaml=b"train: {steps: true}\n")),
         ("seed~0/config.resolved.yaml", "train.steps", "valid integer")),
    Case("aggregate_unknown_study_file", lambda c: [
        "aggregate", "--results", str(c.root / "results"), "--study", str(c.root / "s.yaml")],
         ("study file", "s.yaml does not exist")),
    # --- moebench resolve (a study's grid point) ------------------------------------------
    Case("unknown_strategy", lambda c: c.resolve("--strategy", "aux_free", "--seed", "0"),
         ("strategy='aux_free' is not in the study", "allowed: ['aux_loss', 'none']")),
    Case("unknown_dataset", lambda c: [*c.resolve(), "--dataset", "wiki"],
         ("dataset='wiki' is not in the study", "allowed: ['syn']")),
    Case("seed_not_in_study", lambda c: c.resolve("--strategy", "none", "--seed", "7"),
         ("seed=7 is not in the study", "allowed: [0, 1]")),
    Case("typo_in_strategy_override", lambda c: c.resolve(
        "--strategy", "none", "--seed", "0",
        study={"strategies": {"none": {"balance": {"bias": {"rat": 0.1}}}}}),
         ("strategies.none.balance.bias.rat", "allowed keys: enabled, rate",
          "did you mean 'rate'?")),
    Case("strategy_override_out_of_range", lambda c: c.resolve(
        "--strategy", "none", "--seed", "0", study={"strategies": {"none": {"router": {
            "top_k": 32}}}}),
         ("strategy 'none'", "router.top_k=32 exceeds router.num_experts=16")),
    Case("duplicate_seeds", lambda c: c.resolve(study={"seeds": [0, 0]}),
         ("seeds must be distinct", "[0, 0]")),
    Case("unknown_published_setting", lambda c: c.resolve(
        study={"report": {"compare_to": {"none": ["lf_t9"]}}}),
         ("report.compare_to.none", "'lf_t9' is not a published setting", "'lf_t2_free'")),
    Case("duplicate_strategy", lambda c: ["resolve", "--study", str(_write(
        c.root / "dup.yaml", b"study: rel\nseeds: [0]\ndatasets: {syn: {source: synthetic}}\n"
        b"strategies:\n  a: {}\n  a: {balance: {switch_alpha: 0.01}}\n")), "--dataset", "syn",
        "--output", str(c.out / "run.yaml")],
         ("study file", "dup.yaml", "key 'a' is given twice (lines 5 and 6)")),
    Case("study_empty", lambda c: ["resolve", "--study", str(_write(c.root / "e.yaml", b"")),
                                   "--dataset", "syn", "--output", str(c.out / "run.yaml")],
         ("study file", "e.yaml is empty")),
    Case("infinite_bandwidth_in_study", lambda c: c.resolve(
        study={"comm": {"ib_gbps": float("inf")}}),
         ("comm.ib_gbps", "inf", "finite number")),
    Case("bool_seed_in_study", lambda c: c.resolve(study={"seeds": [True]}),
         ("seeds.0", "valid integer")),
    Case("odd_head_dim_in_study", lambda c: c.resolve(
        study={"strategies": {"none": {"model": {"d_model": 30, "n_heads": 2}}}}),
         ("strategy 'none'", "model.d_model / model.n_heads = 15", "must be even for RoPE")),
    Case("report_baseline_not_in_study", lambda c: c.resolve(
        study={"report": {"baseline": "aux_free"}}),
         ("report.baseline", "strategy 'aux_free' is not in the study", "['aux_loss', 'none']")),
]


def snapshot(root: Path) -> set[str]:
    """Every path under `root` (files and folders, hidden ones included)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def ctx(tmp_path: Path, data_dir: Path, trace: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    monkeypatch.chdir(tmp_path)  # relative defaults (work/ckpt, results/) land here
    c = Ctx(tmp_path, data_dir, trace)
    c.config.write_text(yaml.safe_dump(RUN | {"data_dir": str(data_dir)}))
    return c


def test_catalog_is_large_and_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_before_any_work(case: Case, ctx: Ctx) -> None:
    argv = case.argv(ctx)
    before = snapshot(ctx.root)
    result = CliRunner().invoke(app, argv)
    message = result.stderr
    assert result.exit_code == 2, (case.id, result.output)
    assert "Traceback" not in result.output
    for part in case.expect:
        assert part in message, (case.id, part, message)
    assert snapshot(ctx.root) == before, f"{case.id} wrote {snapshot(ctx.root) - before}"


@pytest.mark.parametrize("where", ["out", "ckpt"])
def test_unwritable_output_is_refused_before_any_work(where: str, ctx: Ctx) -> None:
    locked = ctx.root / "locked"
    args = {"out": str(ctx.out), "ckpt": str(ctx.ckpt)} | {where: str(locked / "run")}
    with unwritable(locked):
        before = snapshot(ctx.root)
        result = CliRunner().invoke(app, ["train", "--config", str(ctx.config),
                                          "--out", args["out"], "--ckpt-dir", args["ckpt"]])
        after = snapshot(ctx.root)
    assert result.exit_code == 2, result.output
    assert "locked/run" in result.stderr and "not writable" in result.stderr
    assert after == before


def test_data_output_unwritable_is_refused_before_any_work(ctx: Ctx) -> None:
    locked = ctx.root / "locked"
    with unwritable(locked):
        before = snapshot(ctx.root)
        result = CliRunner().invoke(app, ["data", "--out", str(locked / "d"),
                                          *sets("data.source=synthetic")])
        after = snapshot(ctx.root)
    assert result.exit_code == 2
    assert "out_dir=" in result.stderr and "is not writable" in result.stderr
    assert after == before


def test_console_script_reports_bad_input_without_traceback(ctx: Ctx) -> None:
    """The installed `moebench` entry point (what Snakemake rules call) gives the same exit
    code and one-line message as the in-process CLI."""
    proc = subprocess.run(
        [sys.executable, "-c", "from moebench.cli import main; main()",
         *ctx.train(*sets("router.score_fn=softmaxx"))],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("moebench train: error: invalid run config")
    assert "router.score_fn" in proc.stderr and "Traceback" not in proc.stderr
    assert not ctx.out.exists() and not ctx.ckpt.exists()


def test_nan_router_logits_stop_cleanly_and_resume_from_last_good_checkpoint(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN router logits at step 6 (checkpoints every 2 steps): exit 3 naming the MoE layer
    and the step, the run directory holds only complete files (no summary), the checkpoint
    stays at step 4; rerunning once the cause is gone resumes from step 4 and finishes."""
    original = MoELayer.router_logits
    steps = {"n": 0}

    def poisoned(self: MoELayer, x_TH: torch.Tensor) -> torch.Tensor:
        logits = original(self, x_TH)
        if self.training:
            steps["n"] += 1
            if steps["n"] == 6:  # one MoE layer, one micro-batch per step: the 6th step
                return logits * float("nan")
        return logits

    with monkeypatch.context() as m:
        m.setattr(MoELayer, "router_logits", poisoned)
        result = CliRunner().invoke(app, ctx.train())
    assert result.exit_code == 3, result.output
    assert "training diverged at step 6: router logits of MoE layer 0" in result.stderr
    assert "last good checkpoint: step 4 in" in result.stderr and "Traceback" not in result.output
    assert torch.load(ctx.ckpt / CKPT_NAME, weights_only=True)["step"] == 4
    assert not (ctx.out / "summary.json").exists()
    assert [p.name for p in ctx.ckpt.iterdir()] == [CKPT_NAME]
    lines = (ctx.out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"train"' in x] == [2, 4]

    result = CliRunner().invoke(app, ctx.train())
    assert result.exit_code == 0, result.output
    assert "resuming from step 4" in result.stderr
    assert json.loads((ctx.out / "summary.json").read_text())["steps"] == 8


def test_second_writer_into_a_run_directory_is_refused(ctx: Ctx) -> None:
    """While another process holds the run directory's lock (a `moebench train` writing
    there), a second `moebench train` into the same --out exits 2 and writes nothing; once the
    lock is free the run trains and leaves no lock file behind."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from moebench.io import "
         "writer_lock\nwith writer_lock(Path(sys.argv[1]), '--out'):\n print('held', "
         "flush=True); sys.stdin.read()", str(ctx.out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(app, ctx.train())
        assert result.exit_code == 2, result.output
        assert "is being written by another process" in result.stderr
        assert "one writer per directory" in result.stderr
        assert [p.name for p in ctx.out.iterdir()] == [".moebench.lock"]
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    result = CliRunner().invoke(app, ctx.train())
    assert result.exit_code == 0, result.output
    assert not (ctx.out / ".moebench.lock").exists()
    assert (ctx.out / "summary.json").is_file()


def test_snakemake_refuses_a_repeated_strategy_before_any_job(tmp_path: Path) -> None:
    """Snakemake's own YAML loader keeps the last of two equal keys; the workflow reads the
    study file again strictly and stops before building the DAG."""
    study = _write(tmp_path / "study.yaml", b"study: rel\nseeds: [0]\ndatasets: {syn: {source: "
                   b"synthetic}}\nstrategies:\n  a: {}\n  a: {balance: {switch_alpha: 0.01}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(Path(__file__).parents[1] / "Snakefile"),
         "-d", str(tmp_path), "--configfile", str(study), "-n"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode != 0
    assert "key 'a' is given twice (lines 5 and 6)" in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".snakemake") == ["study.yaml"]


MISFIT_STUDY = (b"study: big\nseeds: [0, 1]\ndatasets: {syn: {source: synthetic}}\n"
                b"strategies:\n  small: {}\n  huge: {train: {batch_size: 1048576}}\n"
                b"tracking: {uri: null}\n")
"""A study whose `huge` strategy needs far more memory than any machine has (activations)."""


def test_fits_lists_the_runs_that_cannot_train_here(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["fits", "--study", str(_write(tmp_path / "big.yaml",
                                                                      MISFIT_STUDY))])
    assert result.exit_code == 2, result.output
    assert "1 of the (dataset, strategy) pairs of study 'big' cannot train" in result.stderr
    assert "syn/huge: train.batch_size=1048576" in result.stderr
    assert "training needs at least" in result.stderr and "syn/small" not in result.stderr
    fitting = MISFIT_STUDY.replace(b"  huge: {train: {batch_size: 1048576}}\n", b"")
    result = CliRunner().invoke(app, ["fits", "--study", str(_write(tmp_path / "ok.yaml",
                                                                      fitting))])
    assert result.exit_code == 0, result.output
    assert "every run of study 'big' fits this machine" in result.stdout


def test_snakemake_refuses_a_study_that_cannot_fit_before_any_job(tmp_path: Path) -> None:
    """Under the local executor the runs train on this machine: a grid point whose memory
    estimate exceeds its device stops the workflow before the first job."""
    study = _write(tmp_path / "big.yaml", MISFIT_STUDY)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(Path(__file__).parents[1] / "Snakefile"),
         "-d", str(tmp_path), "--configfile", str(study), "--cores", "1"],
        capture_output=True, text=True, check=False,
        env=os.environ | {"MOEBENCH_OUT": str(tmp_path / "work")},
    )
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert "cannot train on this machine" in output and "syn/huge" in output, output
    assert "Traceback" not in output
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["studies"]
