"""moebench.train: every strategy trains on CPU, loss falls on Shakespeare, balancing lowers
MaxVio_global on skewed synthetic data, determinism, kill-and-resume, NaN handling, MLflow,
the CLI's errors and the learning-rate schedule."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import DataConfig, RunConfig, deep_merge
from moebench.data import prepare as prepare_data
from moebench.model import MoELayer
from moebench.train import (
    TIMING_KEYS,
    Trainer,
    TrainingDivergedError,
    lr_at,
    prepare,
    train,
)
from moebench.train.checkpoint import CKPT_NAME
from moebench.train.tracking import Tracker

SHAKESPEARE = DataConfig(source="shakespeare", vocab_size=512, max_bytes=200_000)
SKEWED = DataConfig(source="synthetic", vocab_size=512, synthetic_skew=1.5,
                    synthetic_docs=1000, synthetic_doc_tokens=64)
RUN_FILES = ("config.resolved.yaml", "metrics.jsonl", "timing.jsonl", "summary.json",
             "routing_trace.parquet")


@pytest.fixture(scope="session")
def shakespeare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_shakespeare")
    prepare_data(SHAKESPEARE, out, seed=0)
    return out


@pytest.fixture(scope="session")
def skewed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_skewed")
    prepare_data(SKEWED, out, seed=0)
    return out


def make_cfg(data_dir: Path, data: DataConfig = SHAKESPEARE, **over: Any) -> RunConfig:
    """A tiny run: 3 layers (1 dense), d_model 32, 16 experts top-4 on 2 nodes x 2 GPUs."""
    base: dict[str, Any] = {
        "data_dir": str(data_dir),
        "data": data.model_dump(),
        "model": {"d_model": 32, "n_layers": 3, "n_heads": 2, "n_dense_layers": 1,
                  "dense_hidden": 64, "expert_hidden": 16},
        "router": {"num_experts": 16, "top_k": 4},
        "topology": {"num_nodes": 2, "gpus_per_node": 2},
        "train": {"steps": 20, "batch_size": 4, "seq_len": 32, "warmup_steps": 4,
                  "eval_every": 10, "eval_batches": 2, "log_every": 5, "ckpt_every": 10,
                  "trace_tokens": 100},
    }
    return RunConfig.model_validate(deep_merge(base, over))


def records(out: Path, kind: str) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def summary_without_timing(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


STRATEGIES: dict[str, dict[str, Any]] = {
    "none": {},
    "switch_aux": {"balance": {"switch_alpha": 0.01}},
    "v2_losses": {"router": {"limit": "device", "group_limit": 2},
                  "balance": {"expert_alpha": 0.003, "device_alpha": 0.05, "comm_alpha": 0.02}},
    "seq_aux": {"router": {"score_fn": "sigmoid", "normalize": True},
                "balance": {"seq_alpha": 1e-3, "aux_counts": "actual"}},
    "global_aux": {"balance": {"global_alpha": 0.01}, "train": {"grad_accum": 2}},
    "z_loss": {"router": {"score_fn": "sigmoid", "normalize": True},
               "balance": {"global_alpha": 1e-3, "z_alpha": 1e-3}},
    "aux_free": {"router": {"score_fn": "sigmoid", "normalize": True},
                 "balance": {"bias": {"enabled": True, "rate": 1e-3}},
                 "train": {"grad_accum": 2}},
    "aux_free_mul": {"router": {"score_fn": "sigmoid"},
                     "balance": {"bias": {"enabled": True, "rate": 1e-2,
                                          "rule": "multiplicative", "freeze_frac": 0.5}}},
    "device_limited": {"router": {"limit": "device", "group_limit": 2}},
    "node_limited": {"router": {"score_fn": "sigmoid", "normalize": True, "limit": "node",
                                "group_limit": 1, "group_score": "top2_sum"},
                     "balance": {"bias": {"enabled": True}, "seq_alpha": 1e-4}},
    "capacity": {"balance": {"capacity": {"factor": 1.0}}},
    "device_drop": {"balance": {"capacity": {"factor": 1.0, "level": "device",
                                             "protected_frac": 0.25}}},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_on_cpu(strategy: str, shakespeare_dir: Path,
                                      tmp_path: Path) -> None:
    over = STRATEGIES[strategy]
    cfg = make_cfg(shakespeare_dir, strategy=strategy, **over)
    out = tmp_path / "run"
    summary = train(cfg, out, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["steps"] == 20
    assert math.isfinite(summary["val_loss"]) and summary["val_bpb"] > 0
    assert len(summary["load_global"]) == 2 and len(summary["load_global"][0]) == 16
    assert summary["device"] == "cpu" and summary["machine"].startswith("cpu-")

    train_recs = records(out, "train")
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert [r["step"] for r in records(out, "eval")] == [10, 20]
    alphas = {k.removesuffix("_alpha") for k, v in cfg.balance.model_dump().items()
              if k.endswith("_alpha") and v > 0}
    for r in train_recs:
        assert set(r["aux"]) == alphas
        assert r["loss"] == pytest.approx(r["ce_loss"] + sum(r["aux"].values()))
        tokens = cfg.train.grad_accum * 4 * 32 * 4
        assert [sum(layer) for layer in r["load"]] == [tokens, tokens]

    table = pq.read_table(out / "routing_trace.parquet")
    meta = json.loads(table.schema.metadata[b"moebench"])
    assert meta["num_experts"] == 16 and meta["top_k"] == 4 and meta["num_tokens"] == 100
    assert table.num_rows == 2 * 100 * 4
    assert [str(t) for t in table.schema.types] == ["int16", "int32", "int8", "int16", "float"]
    trace = table.to_pandas()
    limit = cfg.router.limit
    if limit != "none":
        per_group = 16 // cfg.num_groups
        groups = trace.assign(group=trace.expert // per_group).groupby(["layer", "token"])
        assert groups.group.nunique().max() <= cfg.router.group_limit

    drop = summary["drop_frac"]
    assert (drop > 0) == (cfg.balance.capacity.factor is not None)
    state = torch.load(tmp_path / "ckpt" / CKPT_NAME, weights_only=True)
    assert state["step"] == 20
    if cfg.balance.bias.enabled:
        b = cfg.balance.bias
        bias_LE, start = state["bias"]["bias_LE"], (1.0 if b.rule == "multiplicative" else 0.0)
        updating = math.floor(b.freeze_frac * 20)
        moves = (bias_LE - start) / b.rate  # one +-rate (or 0) step per optimizer step
        assert state["bias"]["last_step"] == 19
        assert bool((moves - moves.round()).abs().max() < 1e-2)
        assert bool(moves.abs().max() <= updating + 1e-3) and bool(moves.abs().max() > 0)


def test_loss_falls_on_shakespeare(shakespeare_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(shakespeare_dir, model={"d_model": 64, "n_heads": 4, "expert_hidden": 32},
                   train={"steps": 40, "batch_size": 8, "eval_every": 20, "eval_batches": 4})
    train(cfg, tmp_path / "run", tmp_path / "ckpt")
    evals = [r["val_loss"] for r in records(tmp_path / "run", "eval")]
    first_train = records(tmp_path / "run", "train")[0]
    assert first_train["step"] == 5 and first_train["ce_loss"] > math.log(512) - 0.5
    assert len(evals) == 2
    assert evals[-1] < math.log(512) - 1.0  # far below the uniform predictor
    assert evals[-1] < first_train["ce_loss"] - 0.5


@pytest.mark.slow
def test_balancing_lowers_maxvio_global_on_skewed_data(skewed_dir: Path, tmp_path: Path) -> None:
    """Topic skew 1.5 concentrates the unbalanced (sigmoid, as [LF]) router on few experts;
    the aux-loss-free bias and the aux losses spread it ([LF] Fig. 1 in miniature). Seeds
    0-2 gave none ~4.6 and at most 1.1 (bias), 2.1 (switch), 0.4 (seq): margin 0.6 x none."""
    over = {
        "dataset": "skewed",
        "router": {"top_k": 2, "score_fn": "sigmoid"},
        "model": {"n_layers": 2},
        "train": {"steps": 150, "batch_size": 8, "eval_every": 1000, "eval_batches": 16,
                  "log_every": 50, "ckpt_every": 1000},
    }
    strategies = {
        "none": {},
        "aux_free": {"balance": {"bias": {"enabled": True, "rate": 0.01}}},
        "switch_aux": {"balance": {"switch_alpha": 0.1}},
        "seq_aux": {"balance": {"seq_alpha": 0.05}},
    }
    maxvio = {}
    for name, extra in strategies.items():
        cfg = make_cfg(skewed_dir, SKEWED, strategy=name, **deep_merge(over, extra))
        maxvio[name] = train(cfg, tmp_path / name, tmp_path / f"ckpt_{name}")["maxvio_global"]
    assert maxvio["none"] > 3.0, maxvio
    for name in ("aux_free", "switch_aux", "seq_aux"):
        assert maxvio[name] < 0.6 * maxvio["none"], maxvio


def test_same_config_and_seed_give_identical_files(shakespeare_dir: Path,
                                                   tmp_path: Path) -> None:
    cfg = make_cfg(shakespeare_dir, balance={"bias": {"enabled": True}, "seq_alpha": 1e-3},
                   router={"score_fn": "sigmoid"})
    for name in ("a", "b"):
        train(cfg, tmp_path / name, tmp_path / f"ckpt_{name}")
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert (a / "routing_trace.parquet").read_bytes() == (b / "routing_trace.parquet").read_bytes()
    assert summary_without_timing(a) == summary_without_timing(b)
    other = make_cfg(shakespeare_dir, seed=1, balance={"bias": {"enabled": True},
                     "seq_alpha": 1e-3}, router={"score_fn": "sigmoid"})
    train(other, tmp_path / "c", tmp_path / "ckpt_c")
    assert (a / "metrics.jsonl").read_bytes() != (tmp_path / "c" / "metrics.jsonl").read_bytes()


def test_killed_and_resumed_run_equals_uninterrupted_run(
    shakespeare_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    over = {"balance": {"bias": {"enabled": True}, "expert_alpha": 0.01},
            "train": {"steps": 60, "log_every": 3, "ckpt_every": 10, "eval_every": 25}}
    cfg = make_cfg(shakespeare_dir, **over)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    out, ckpt = tmp_path / "killed", tmp_path / "ckpt_killed"
    cmd = [sys.executable, "-c", "from moebench.cli import main; main()", "train",
           "--config", str(config), "--out", str(out), "--ckpt-dir", str(ckpt)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (ckpt / CKPT_NAME).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()
    killed_at = torch.load(ckpt / CKPT_NAME, weights_only=True)["step"]
    assert 10 <= killed_at < 60

    with caplog.at_level(logging.INFO, logger="moebench"):
        train(cfg, out, ckpt)  # the same run, resumed in this process (saves a torch import)
    assert f"resuming from step {killed_at}" in caplog.text

    train(cfg, tmp_path / "straight", tmp_path / "ckpt_straight")
    straight = tmp_path / "straight"
    assert (out / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
    assert summary_without_timing(out) == summary_without_timing(straight)
    assert (out / "routing_trace.parquet").read_bytes() == (
        straight / "routing_trace.parquet").read_bytes()
    timing_steps = [json.loads(x)["step"] for x in (out / "timing.jsonl").read_text().splitlines()]
    assert timing_steps == list(range(3, 61, 3))


def test_nan_router_logits_stop_with_layer_and_step(shakespeare_dir: Path,
                                                    tmp_path: Path) -> None:
    trainer = Trainer(prepare(make_cfg(shakespeare_dir), tmp_path / "run", tmp_path / "ck"))
    trainer.train_step()
    trainer.train_step()
    with torch.no_grad():
        trainer.model.moe_layers[1].router.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="step 3: router logits of MoE layer 1"):
        trainer.train_step()


def test_evaluation_moves_neither_bias_nor_data_order(shakespeare_dir: Path,
                                                      tmp_path: Path) -> None:
    cfg = make_cfg(shakespeare_dir, balance={"bias": {"enabled": True, "rate": 0.1}})
    trainer = Trainer(prepare(cfg, tmp_path / "run", tmp_path / "ck"))
    trainer.train_step()
    bias, rng = trainer.bias.bias_LE.clone(), trainer.batch_generator.get_state()
    first, _ = trainer.evaluate()
    second, _ = trainer.evaluate()
    assert first == second
    assert torch.equal(trainer.bias.bias_LE, bias)
    assert torch.equal(trainer.batch_generator.get_state(), rng)
    assert int(trainer.bias.counts_LE.sum()) == 0


def test_cli_nan_exits_3_and_keeps_the_last_good_checkpoint(
    shakespeare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = MoELayer.router_logits
    calls = {"n": 0}

    def poisoned(self: MoELayer, x_TH: torch.Tensor) -> torch.Tensor:
        logits = original(self, x_TH)
        if self.training and self.index == 1:
            calls["n"] += 1
            if calls["n"] > 13:  # the 14th optimizer step
                return logits * float("nan")
        return logits

    monkeypatch.setattr(MoELayer, "router_logits", poisoned)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(make_cfg(shakespeare_dir).model_dump(mode="json")))
    ckpt = tmp_path / "ck"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out",
                                      str(tmp_path / "run"), "--ckpt-dir", str(ckpt)])
    assert result.exit_code == 3
    assert "training diverged at step 14: router logits of MoE layer 1" in result.stderr
    assert "last good checkpoint: step 10" in result.stderr
    assert torch.load(ckpt / CKPT_NAME, weights_only=True)["step"] == 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.steps=0"], "train.steps"),
        (["--set", "data_dir=/nonexistent/data"], "does not exist"),
        (["--set", "tracking.uri=http://127.0.0.1:9"], "does not answer"),
        (["--set", "model.nonsense=1"], "model.nonsense"),
    ],
    ids=["invalid_value", "missing_data", "mlflow_down", "unknown_key"],
)
def test_cli_bad_input_exits_2_and_writes_nothing(
    args: list[str], message: str, shakespeare_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(make_cfg(shakespeare_dir).model_dump(mode="json")))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--out", str(out),
                                      "--ckpt-dir", str(tmp_path / "ck"), *args])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_mlflow_sqlite_logs_params_metrics_and_artifacts(
        shakespeare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # a 3-second run

    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    cfg = make_cfg(shakespeare_dir, study="demo", tracking={"uri": uri, "experiment": "demo"},
                   strategy="aux_free", router={"num_experts": 16, "top_k": 4,
                                                "score_fn": "sigmoid"},
                   balance={"bias": {"enabled": True, "rate": 1e-2}})
    summary = train(cfg, tmp_path / "run", tmp_path / "ck")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("demo")
    assert experiment.artifact_location.startswith((tmp_path / "mlflow" / "mlruns").as_uri())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "aux_free/seed~0 (shakespeare)"
    assert run.data.params["model.d_model"] == "32"
    assert run.data.params["router.num_experts"] == "16"
    assert run.data.params["seed"] == "0" and "seed" not in run.data.metrics
    assert run.data.tags["mlflow.source.name"] == "moebench train"
    assert run.data.tags["mlflow.source.git.commit"] == summary["git_sha"]
    # one key per number: the final evaluation's val_loss, no summary.* copy of it
    assert run.data.metrics["val_loss"] == pytest.approx(summary["val_loss"])
    assert not any(k.startswith("summary.") for k in run.data.metrics)
    assert run.data.metrics["maxvio_batch_mean"] == pytest.approx(summary["maxvio_batch_mean"])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert {"maxvio_batch", "maxvio_batch_layers.1", "val_ppl", "tokens_per_s"} <= set(
        run.data.metrics)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    bias = client.get_metric_history(run.info.run_id, "bias_spread")
    assert [m.step for m in bias] == [5, 10, 15, 20] and bias[-1].value > 0
    assert {"bias_norm", "bias_norm_layers.1", "bias_spread_layers.0"} <= set(run.data.metrics)
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.name == "shakespeare"
    assert data_input.dataset.source_type == "local"
    assert str(shakespeare_dir.resolve()) in data_input.dataset.source
    assert {(t.key, t.value) for t in data_input.tags} == {("mlflow.data.context", "training")}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "config.resolved.yaml"} <= artifacts

    with pytest.raises(ValueError, match="parent_run_id='nope' is not a run"):
        prepare(make_cfg(shakespeare_dir, tracking={"uri": uri, "parent_run_id": "nope"}),
                tmp_path / "never", tmp_path / "ck_never")
    parent = client.create_run(experiment.experiment_id, run_name="study-parent")
    child_cfg = make_cfg(shakespeare_dir, study="demo", seed=1,
                         tracking={"uri": uri, "experiment": "other",
                                   "parent_run_id": parent.info.run_id})
    child = client.get_run(Tracker(child_cfg).run_id)
    assert child.info.experiment_id == experiment.experiment_id  # the parent's, not "other"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["seed"] == "1" and child.data.params["seed"] == "1"


def test_a_run_that_loses_the_dataset_insert_race_keeps_tracking(
    shakespeare_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent runs of a study log the same dataset; the SQL store looks the row up, then
    inserts it, so the slower run's insert fails (seen in CI: "IntegrityError: UNIQUE
    constraint failed: datasets.experiment_id, datasets.name, datasets.digest"). Here the
    other run's insert lands between this run's lookup and insert, once, on a real store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = make_cfg(shakespeare_dir, study="demo", tracking={"uri": uri, "experiment": "demo"})
    winner = Tracker(cfg)
    real = MlflowClient.log_inputs
    raced: list[str] = []

    def lose_once(client: MlflowClient, run_id: str, datasets: Any = None, **kw: Any) -> None:
        if not raced:
            raced.append(run_id)
            real(client, winner.run_id, datasets)  # the other run's insert, just before ours
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                  "datasets.experiment_id, datasets.name, datasets.digest")
        real(client, run_id, datasets, **kw)

    monkeypatch.setattr(MlflowClient, "log_inputs", lose_once)
    loser = Tracker(cfg.model_copy(update={"seed": 1}))
    assert raced == [loser.run_id] and loser.lost is None
    runs = [MlflowClient(uri).get_run(t.run_id) for t in (winner, loser)]
    (a,), (b,) = (r.inputs.dataset_inputs for r in runs)
    assert a.dataset.digest == b.dataset.digest and a.dataset.name == "shakespeare"


def test_lr_schedule_warmup_then_cosine_to_floor(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(
        {"train": {"steps": 100, "lr": 1e-3, "warmup_steps": 10, "min_lr_frac": 0.1}})
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)
    mid = lr_at(10 + 89 // 2, cfg)
    assert 0.5e-3 < mid < 0.6e-3
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert lrs == sorted(lrs, reverse=True)
