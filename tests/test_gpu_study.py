"""configs/gpu_study.yaml: the grid the issue asks for, one gate for every balancing comparison,
paired seeds (the same initial weights and batches for a seed in every MoE strategy), the
dense baseline's active parameters, the token budget, and 3 training runs sharing one GPU
under `snakemake --resources gpu=1`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (
    ConfigSettings,
    OutputSettings,
    Quietness,
    ResourceSettings,
)
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import DataConfig, RunConfig, StudyConfig, deep_merge, load_study
from moebench.data import prepare as prepare_data
from moebench.model import MoETransformer
from moebench.train import Trainer, prepare

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs/gpu_study.yaml"


@pytest.fixture(scope="module")
def study() -> StudyConfig:
    return load_study(STUDY)


def configs(study: StudyConfig, seed: int = 0) -> dict[str, RunConfig]:
    return {s: study.run_config("mixed", s, seed) for s in study.strategies}


def test_the_grid_of_the_issue(study: StudyConfig) -> None:
    cfgs = configs(study)
    assert len(study.seeds) >= 3
    sweeps = {
        "global_alpha": sorted(c.balance.global_alpha for s, c in cfgs.items()
                               if s.startswith("global_aux_") and not s.endswith("_z")),
        "bias_rate": sorted(c.balance.bias.rate for s, c in cfgs.items()
                            if s.startswith("aux_free_")),
        "device_m": sorted(c.router.group_limit for c in cfgs.values()
                           if c.router.limit == "device"),
        "node_m": sorted(c.router.group_limit for c in cfgs.values() if c.router.limit == "node"),
    }
    assert sweeps == {"global_alpha": [1e-4, 1e-3, 1e-2, 1e-1], "bias_rate": [1e-4, 1e-3, 1e-2],
                      "device_m": [1, 2, 3], "node_m": [1, 2, 4]}
    assert cfgs["seq_aux_1e-3"].balance.seq_alpha == 1e-3
    assert [s for s, c in cfgs.items() if c.balance.z_alpha > 0] == ["global_aux_1e-3_z"]
    assert cfgs["dense"].model.n_dense_layers == cfgs["dense"].model.n_layers
    # one gate for every balancing comparison; softmax only for the default study's two
    softmax = sorted(s for s, c in cfgs.items() if c.router.score_fn == "softmax")
    assert softmax == ["aux_loss", "aux_loss_v2"]
    assert all(c.router.normalize for s, c in cfgs.items() if s not in softmax)
    assert study.datasets["mixed"].source == "mixed"


def test_model_size_budget_and_checkpoints(study: StudyConfig) -> None:
    """~35M active parameters with 96 fine-grained experts + 1 shared; the dense baseline has
    the same active parameters but for the routers; >= 25M tokens per run."""
    cfgs = configs(study)
    moe = MoETransformer(cfgs["none"].transformer_config(8192))  # ~1.2 GB, briefly
    _, moe_active = moe.param_counts()
    del moe
    dense_total, dense_active = MoETransformer(cfgs["dense"].transformer_config(8192)
                                               ).param_counts()
    m, r = cfgs["none"].model, cfgs["none"].router
    assert 20e6 <= moe_active <= 50e6 and r.num_experts >= 64 and m.n_shared_experts == 1
    routers = (m.n_layers - m.n_dense_layers) * m.d_model * r.num_experts
    assert dense_active == dense_total == moe_active - routers
    for c in cfgs.values():
        t = c.train
        assert t.steps * t.batch_size * t.grad_accum * t.seq_len >= 25_000_000
        assert t.grad_accum > 1  # the global-batch loss spans micro-batches
        assert t.steps // t.eval_every >= 3 and t.ckpt_every <= t.steps // 3


def test_seeds_are_paired_across_strategies(study: StudyConfig) -> None:
    """Every MoE strategy of a seed has the same model, data and training sections: only
    routing and balancing differ (the dense baseline differs in its model only)."""
    for seed in study.seeds:
        cfgs = configs(study, seed)
        shared = {(c.model, c.train, c.data, c.data_dir, c.topology, c.seed)
                  for s, c in cfgs.items() if s != "dense"}
        assert len(shared) == 1
        dense = cfgs["dense"]
        assert (dense.train, dense.data, dense.seed) == (cfgs["none"].train, cfgs["none"].data,
                                                         seed)


def test_initial_weights_and_batches_do_not_depend_on_the_strategy(
    study: StudyConfig, tmp_path: Path
) -> None:
    """Through the trainer itself, on a tiny model and data with each strategy's routing and
    balancing: for a seed, every MoE strategy starts from the same weights and draws the
    same first batch; another seed changes both."""
    data = DataConfig(source="synthetic", vocab_size=300, synthetic_docs=20,
                      synthetic_doc_tokens=64)
    prepare_data(data, tmp_path / "data", seed=0)
    tiny = {"data_dir": str(tmp_path / "data"), "data": data.model_dump(),
            "tracking": {"uri": None},
            "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "n_dense_layers": 1,
                      "dense_hidden": 32, "expert_hidden": 4},
            "train": {"batch_size": 2, "seq_len": 16, "device": "cpu"}}

    def start(strategy: str, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raw = deep_merge(study.run_config("mixed", strategy, seed).model_dump(), tiny)
        trainer = Trainer(prepare(RunConfig.model_validate(raw), tmp_path / "run",
                                  tmp_path / "ckpt" / strategy))
        first, _ = trainer.run_spec.train_data.batch(trainer.batch_generator, 2, 16)
        return trainer.model.state_dict(), first

    weights, batch = start("none", 0)
    for strategy in study.strategies:
        if strategy == "dense":
            continue
        other_weights, other_batch = start(strategy, 0)
        assert torch.equal(other_batch, batch), strategy
        assert other_weights.keys() == weights.keys(), strategy
        assert all(torch.equal(other_weights[k], v) for k, v in weights.items()), strategy
    seed1_weights, seed1_batch = start("none", 1)
    assert not torch.equal(seed1_batch, batch)
    assert not torch.equal(seed1_weights["embed.weight"], weights["embed.weight"])


def _dry_run(workdir: Path, configfile: Path, resources: dict[str, int]) -> tuple[list[Any], Any]:
    """Jobs and global resources of a Snakemake dry run with `--resources`."""
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(
            snakefile=REPO / "Snakefile",
            workdir=workdir,
            config_settings=ConfigSettings(configfiles=[configfile]),
            resource_settings=ResourceSettings(cores=16, resources=resources),
        )
        wf.dag().execute_workflow(executor="dryrun")
        workflow = wf._workflow
        return list(workflow.dag.needrun_jobs(exclude_finished=False)), workflow.global_resources


def test_three_runs_share_one_gpu(tmp_path: Path) -> None:
    """runs_per_gpu 3 and `--resources gpu=1`: 3 `gpu_slots`, one per training job (which
    holds no whole `gpu`); the kernel check still takes the whole GPU."""
    study = yaml.safe_load(STUDY.read_text())
    study["strategies"] = {"none": {}}
    del study["report"]  # it names the strategies left out
    config = tmp_path / "share.yaml"
    config.write_text(yaml.safe_dump(study))
    jobs, available = _dry_run(tmp_path, config, {"gpu": 1})
    assert available.get("gpu_slots").value == 3
    train = [j for j in jobs if j.rule.name == "train"]
    assert len(train) == 3
    for job in train:
        assert (job.resources["gpu"], job.resources["gpu_slots"]) == (0, 1)
    (kernels,) = [j for j in jobs if j.rule.name == "kernels"]
    assert kernels.resources["gpu"] == 1


def test_committed_tables_regenerate_from_the_committed_runs(tmp_path: Path) -> None:
    """`moebench aggregate --partial` over results/reference/gpu_study's run directories
    rewrites the committed tables byte for byte (figures are left to matplotlib's version)."""
    committed = REPO / "results/reference/gpu_study"
    shutil.copytree(committed / "runs", tmp_path / "runs")
    result = CliRunner().invoke(app, ["aggregate", "--study", str(STUDY), "--results",
                                      str(tmp_path), "--partial"])
    assert result.exit_code == 0, result.output
    for name in ("gpu_study.md", "gpu_study.csv", "gpu_study-paired.csv",
                 "gpu_study-claims.md", "gpu_study.html"):
        assert (tmp_path / "tables" / name).read_bytes() == (
            committed / "tables" / name).read_bytes(), name
