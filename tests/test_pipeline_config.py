"""Study configs: the committed JSON schema matches StudyConfig, every shipped study loads,
strategies merge over `base` as documented, and bad studies are refused (by pydantic, and by
`snakemake -n --configfile` before any job, naming the field)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import RunConfig, load_run_config, load_study, study_from_dict
from moebench.report.stats import CANONICAL_ORDER
from moebench.report.study import SCHEMA_FILE, schema_text

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "configs").glob("*.yaml"))
DEFAULT_STRATEGIES = set(CANONICAL_ORDER)


def minimal(**over: object) -> dict[str, object]:
    return {
        "study": "t",
        "seeds": [0],
        "datasets": {"shakespeare": {}},
        "strategies": {"none": {}},
    } | over


def test_committed_schema_is_in_sync() -> None:
    assert (REPO / SCHEMA_FILE).read_text() == schema_text(), "run `moebench schema`"
    schema = yaml.safe_load(schema_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False


def test_schema_command_check_mode(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "s.json"
    assert runner.invoke(app, ["schema", "--output", str(out), "--check"]).exit_code == 1
    assert runner.invoke(app, ["schema", "--output", str(out)]).exit_code == 0
    assert runner.invoke(app, ["schema", "--output", str(out), "--check"]).exit_code == 0


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_load(path: Path) -> None:
    study = load_study(path)
    assert study_from_dict(study.to_dict()) == study
    for dataset in study.datasets:
        for strategy in study.strategies:
            cfg = study.run_config(dataset, strategy, study.seeds[-1])
            assert (cfg.study, cfg.strategy, cfg.seed) == (study.study, strategy, study.seeds[-1])


def test_default_study_grid_and_binding_limits() -> None:
    study = load_study(REPO / "configs/default.yaml")
    assert set(study.strategies) == DEFAULT_STRATEGIES
    assert study.seeds == [0, 1, 2] and list(study.datasets) == ["shakespeare"]
    for strategy in ("device_limited", "node_limited"):
        cfg = study.run_config("shakespeare", strategy, 0)
        # unrestricted top-K could span more than M groups, so the limit binds
        assert min(cfg.router.top_k, cfg.num_groups) > cfg.router.group_limit


def test_strategy_override_merges_over_base() -> None:
    study = load_study(REPO / "configs/default.yaml")
    base = study.run_config("shakespeare", "none", 0)
    free = study.run_config("shakespeare", "aux_free", 1)
    assert free.router.score_fn == "sigmoid" and free.router.normalize
    assert free.balance.bias.enabled and not base.balance.bias.enabled
    assert free.balance.bias.rule == base.balance.bias.rule == "sign"  # untouched field kept
    assert free.model == base.model and free.train == base.train
    assert free.data_dir == "work/data/default/shakespeare"
    assert free.tracking.uri == study.tracking.uri and free.tracking.experiment == "default"


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_keep_their_gate_rule(path: Path) -> None:
    """The committed runs normalised sigmoid gates and not softmax ones; the per-score-function
    default of `router.normalize` gives every shipped grid point the same rule."""
    study = load_study(path)
    for strategy in study.strategies:
        r = study.run_config(next(iter(study.datasets)), strategy, study.seeds[0]).router
        assert r.normalize is (r.score_fn == "sigmoid"), strategy


def test_unset_normalize_follows_the_score_function() -> None:
    """Unset: sigmoid with K > 1 normalises (V3, Megatron), softmax does not (Switch, V2);
    a strategy switching to sigmoid over a softmax base gets the sigmoid default."""
    assert RunConfig().router.normalize is False
    assert RunConfig(router={"score_fn": "sigmoid"}).router.normalize is True
    assert RunConfig(router={"score_fn": "sigmoid", "top_k": 1}).router.normalize is False
    assert RunConfig(router={"score_fn": "sigmoid", "normalize": False}).router.normalize is False
    assert RunConfig(router={"normalize": True}).router.normalize is True
    study = study_from_dict(minimal(strategies={"sig": {"router": {"score_fn": "sigmoid"}}}))
    assert study.run_config("shakespeare", "sig", 0).router.normalize is True
    assert "normalize: true" in yaml.safe_dump(
        study.run_config("shakespeare", "sig", 0).model_dump(mode="json")
    )  # the resolved config states the rule the run used


def test_unset_group_limit_means_no_limit() -> None:
    """`limit: node` without `group_limit` keeps all nodes (M = G), as peers read it."""
    cfg = RunConfig(router={"limit": "node"})
    assert cfg.router.group_limit == cfg.topology.num_nodes == 4  # resolved: every node
    runtime = cfg.router_config()
    assert runtime.group_limit == 4 and not runtime.group_limited
    assert RunConfig(router={"limit": "device"}).router.group_limit == 8
    assert RunConfig().router.group_limit == 1  # limit none: one group
    assert RunConfig(router={"limit": "node", "group_limit": 2}).router.group_limit == 2
    assert "group_limit: 4" in yaml.safe_dump(cfg.model_dump(mode="json"))
    # M = G with K < M is plain top-K, whatever the group score
    cfg = RunConfig(router={"limit": "node", "top_k": 2, "group_limit": 4,
                            "group_score": "topk_sum"})
    assert not cfg.router_config().group_limited


@pytest.mark.parametrize(
    ("strategies", "message"),
    [
        ({"x": {"router": {"limitt": "node"}}}, "strategies.x.router.limitt: Extra inputs"),
        ({"x": {"balance": {"bias": {"rate": -1}}}}, "strategies.x.balance.bias.rate"),
        ({"x": {"router": {"score_fn": None}}}, "strategies.x.router.score_fn"),
        (
            {"x": {"router": {"limit": "node", "group_limit": 9}}},
            "strategy 'x' .* router.group_limit=9 exceeds the 4 nodes",
        ),
        (
            {"x": {"balance": {"bias": {"rule": "multiplicative"}}}},
            "strategy 'x' .* needs router.score_fn='sigmoid'",
        ),
    ],
)
def test_bad_strategy_is_refused(strategies: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        study_from_dict(minimal(strategies=strategies))


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"study": "a/b"}, "study: String should match pattern"),
        ({"datasets": {"s": {"vocab_size": 10}}}, "datasets.s.vocab_size"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_study_is_refused(over: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        study_from_dict(minimal(**over))


def test_grid_point_must_exist() -> None:
    study = study_from_dict(minimal())
    with pytest.raises(ValueError, match="strategy='aux' is not in the study"):
        study.run_config("shakespeare", "aux", 0)
    with pytest.raises(ValueError, match="seed=3 is not in the study"):
        study.run_config("shakespeare", "none", 3)


def test_resolve_command_writes_a_run_config(tmp_path: Path) -> None:
    runner = CliRunner()
    study = REPO / "configs/default.yaml"
    out = tmp_path / "run.yaml"
    args = ["resolve", "--study", str(study), "--dataset", "shakespeare"]
    res = runner.invoke(
        app, [*args, "--strategy", "node_limited", "--seed", "2", "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    cfg = load_run_config(out)
    assert cfg == load_study(study).run_config("shakespeare", "node_limited", 2)
    res = runner.invoke(app, [*args, "--output", str(tmp_path / "data.yaml")])
    assert res.exit_code == 0, res.output
    assert RunConfig.model_validate(yaml.safe_load((tmp_path / "data.yaml").read_text())).data
    res = runner.invoke(app, [*args, "--strategy", "nope", "--seed", "0", "--output", str(out)])
    assert res.exit_code == 2 and "strategy='nope' is not in the study" in res.output


def snakemake_dry_run(workdir: Path, *configfiles: Path) -> subprocess.CompletedProcess[str]:
    files = [str(f) for f in configfiles]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(workdir),
            "--configfile",
            *files,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # unknown key inside a strategy: the JSON schema names it
        ({"strategies": {"aux_free": {"balance": {"bias": {"rat": 0.1}}}}}, "'rat' was unexpected"),
        # out-of-range value: the schema names the field path and the bound
        ({"base": {"train": {"steps": 0}}}, "0 is less than the minimum of 1"),
        # cross-field rule: pydantic at parse time, naming strategy and field
        (
            {"strategies": {"node_limited": {"router": {"group_limit": 9}}}},
            "strategy 'node_limited' (dataset 'shakespeare') gives an invalid run config: "
            "router.group_limit=9 exceeds the 4 nodes",
        ),
    ],
)
def test_snakemake_refuses_bad_config_before_any_job(
    tmp_path: Path, override: dict[str, object], expected: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(override))
    res = snakemake_dry_run(tmp_path, REPO / "configs/default.yaml", bad)
    assert res.returncode != 0
    assert expected in res.stdout + res.stderr
    assert not (tmp_path / "work").exists()


def test_distributed_tasks_must_match_the_topology() -> None:
    over = {"resources": {"train": {"tasks": 3}}}
    with pytest.raises(ValueError, match=r"resources\.train\.tasks=3 must be 1 or the 8 devices"):
        study_from_dict(minimal(**over))
    assert study_from_dict(minimal(resources={"train": {"tasks": 8}})).resources.train.tasks == 8
