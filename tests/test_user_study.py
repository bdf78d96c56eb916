"""A researcher's own study, as the README's "Your data, your strategies" section runs it:
`moebench new-study` on a local text, `snakemake --config` overrides with their YAML types
(and refused where they would join another study's runs), the small-corpus warnings, and a
new strategy matched to the published settings by what it does, not by its name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from moebench.cli import app
from moebench.config import load_run_config, load_study
from moebench.report.published import match_settings
from moebench.report.study import grid_override_problem, typed_overrides
from moebench.report.summary import load_settings
from moebench.train.loop import epochs_warning
from test_pipeline_dag import pip_section

REPO = Path(__file__).resolve().parents[1]
TEST_STUDY = REPO / "configs/test.yaml"


def small_text(path: Path, paragraphs: int = 60) -> Path:
    """A ~14 KB text of `paragraphs` paragraphs (blank lines between them)."""
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
             "seven", "experts", "route", "tokens")
    lines = [
        " ".join(words[(p + i) % len(words)] for i in range(40)) + "." for p in range(paragraphs)
    ]
    path.write_text("\n\n".join(lines) + "\n")
    return path


def snakemake_n(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile")]
    return subprocess.run(
        [*cmd, "-d", str(workdir), *args], capture_output=True, text=True, timeout=180
    )


def test_config_overrides_get_their_yaml_types() -> None:
    # what `snakemake --config 'datasets={"lic": {...}}'` hands the Snakefile: strings inside
    raw = {"datasets": {"lic": {"source": "file", "vocab_size": "512", "val_fraction": "1e-1"}},
           "seeds": ["0", "1"], "base": {"train": {"compile": "false"}}, "study": "mine"}
    assert typed_overrides(raw) == {
        "datasets": {"lic": {"source": "file", "vocab_size": 512, "val_fraction": 0.1}},
        "seeds": [0, 1],
        "base": {"train": {"compile": False}},
        "study": "mine",
    }
    with pytest.raises(ValueError, match=r"--config base\.train\.steps is not valid YAML"):
        typed_overrides({"base": {"train": {"steps": "[4"}}})


def test_config_may_not_add_to_a_study_without_renaming_it() -> None:
    files = {"study": "default", "datasets": {"shakespeare": {}}, "strategies": {"none": {}}}
    added = {"datasets": {"lic": {"source": "file"}}}
    problem = grid_override_problem(files, added)
    assert problem is not None
    assert "--config datasets: ['lic'] would be added to study 'default'" in problem
    assert "moebench new-study" in problem
    assert grid_override_problem(files, {**added, "study": "mine"}) is None
    # changing values of the study's own strategies or datasets stays allowed
    assert grid_override_problem(files, {"strategies": {"none": {"router": {}}}}) is None


def test_snakemake_config_accepts_typed_values_and_refuses_a_silent_merge(
    tmp_path: Path,
) -> None:
    text = small_text(tmp_path / "mytext.txt")
    lic = f'datasets={{"lic": {{"source": "file", "path": "{text}", "vocab_size": 512}}}}'
    refused = snakemake_n(tmp_path, "--configfile", str(TEST_STUDY), "--config", lic)
    assert refused.returncode != 0
    assert "would be added to study 'test'" in refused.stdout + refused.stderr
    res = snakemake_n(
        tmp_path, "--configfile", str(TEST_STUDY), "--config", "study=mine", lic,
        "base={train: {steps: 20, lr: 1e-3}}",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    study = load_study(tmp_path / "work/studies/mine.yaml")
    assert set(study.datasets) == {"shakespeare", "lic"}
    cfg = study.run_config("lic", "aux_free", 0)
    assert (cfg.data.vocab_size, cfg.train.steps, cfg.train.lr) == (512, 20, 1e-3)


def test_new_study_on_a_text_file_plans_on_slurm(tmp_path: Path) -> None:
    text = small_text(tmp_path / "mytext.txt")
    out = tmp_path / "mine.yaml"
    args = ["new-study", "--name", "mine", "--text", str(text), "--vocab-size", "300",
            "--template", str(TEST_STUDY), "--output", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "study 'mine', 4 runs" in res.output
    study = load_study(out)
    assert list(study.datasets) == ["mytext"]
    assert study.datasets["mytext"].source == "file"
    assert study.datasets["mytext"].path == str(text)
    assert study.tracking.uri == "sqlite:///work/mlflow/mine.db"
    assert set(study.strategies) == set(load_study(TEST_STUDY).strategies)
    again = CliRunner().invoke(app, args)  # never overwrites
    assert again.exit_code == 2 and "exists; allowed: a new file" in again.output
    both = CliRunner().invoke(app, ["new-study", "--name", "x", "--output", str(tmp_path / "x")])
    assert both.exit_code == 2 and "exactly one of --text and --hf" in both.output
    missing = CliRunner().invoke(app, ["new-study", "--name", "x", "--text", "nope.txt",
                                       "--output", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "data.path='nope.txt' is not a file or a folder" in (
        missing.output)
    assert not (tmp_path / "x").exists()
    # the README's SLURM command (planned only: -n submits nothing)
    plan = snakemake_n(
        tmp_path, "--workflow-profile", str(REPO / "workflow/profiles/slurm"), "--configfile",
        str(out), "--default-resources", "slurm_partition=debug",
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "work/runs/mine/mytext/aux_free/seed~1" in plan.stdout


def test_small_text_warns_about_its_split_and_its_epochs(tmp_path: Path) -> None:
    text = small_text(tmp_path / "mytext.txt", paragraphs=60)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "data": {"source": "file", "path": str(text), "vocab_size": 300},
        "data_dir": str(tmp_path / "data"),
    }))
    res = CliRunner().invoke(app, ["data", "--config", str(run), "--out", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    # 14 KB are 2 sections of ~8 KB: one of them is the validation split, not 10%
    assert "the validation split holds" in res.output
    assert "not data.val_fraction=0.1" in res.output and "of 2 documents" in res.output
    cfg = load_run_config(run, ["train.steps=300", "train.batch_size=16", "train.seq_len=64"])
    warning = epochs_warning(cfg, 7000)
    assert warning is not None and "is 43.9 epochs of the 7000 training tokens" in warning
    assert epochs_warning(cfg, 4 * 300 * 16 * 64) is None  # exactly 4 epochs pass


def settings_row(strategy: str, family: str, knob_value: float = 0.0) -> dict[str, object]:
    return {"strategy": strategy, "family": family, "group_limit": 2, "knob_value": knob_value}


def test_a_new_strategy_is_matched_by_what_it_does() -> None:
    runs = pd.DataFrame([
        settings_row("aux_free_fast", "sigmoid none bias.rate", 1e-2),
        settings_row("my_batch_loss", "sigmoid none global_alpha", 1e-3),
        settings_row("softmax_free", "softmax none bias.rate", 1e-3),
        settings_row("free_plus_z", "sigmoid none bias.rate z_alpha", 1e-3),
    ])
    matched = match_settings(runs)
    assert matched["aux_free_fast"] == ["lf_t2_free", "lf_u1e-2", "v3_free", "v3_t5_free"]
    assert matched["my_batch_loss"] == ["lf_t2_aux", "v3_batch"]
    assert matched["softmax_free"] == ["lf_t6_free"]
    assert "free_plus_z" not in matched  # the z-loss is another recipe
    # two strategies of one recipe: the canonical name first, then by name
    two = pd.DataFrame([settings_row("b_free", "sigmoid none bias.rate", 1e-3),
                        settings_row("aux_free", "sigmoid none bias.rate", 1e-2)])
    assert match_settings(two) == {
        "aux_free": ["lf_t2_free", "lf_u1e-2", "v3_free", "v3_t5_free"],
        "b_free": ["lf_u1e-3"],
    }


def test_cli_version_and_plain_help() -> None:
    from moebench import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"moebench {__version__}\n"
    for command in ([], ["train"], ["aggregate"], ["new-study"]):
        text = CliRunner().invoke(app, [*command, "--help"], terminal_width=100).output
        assert "<bool>" not in text and "--help" in text
    train = CliRunner().invoke(app, ["train", "--help"], terminal_width=100).output
    assert "--set KEY=VALUE" in train
    # a docstring's paragraph is re-wrapped, not cut where the source line ended
    assert "Exit 2: bad input (nothing written under --out)" in " ".join(train.split())
    assert "(nothing\n" not in train  # the source's line break inside the sentence is gone


def test_environment_yml_pins_the_runtime_dependencies_of_pyproject() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = pip_section(env)
    assert [p for p in pip if p != "-e ."] == project["dependencies"]
    assert not set(project["optional-dependencies"]["dev"]) & set(pip)  # no test tools


def readme_block(after: str, lang: str) -> str:
    """The first ```lang block of the README after the line holding `after`."""
    text = (REPO / "README.md").read_text().split(after, 1)[1]
    return text.split(f"```{lang}\n", 1)[1].split("```", 1)[0]


def test_readme_new_strategy_block_is_matched_to_the_aux_free_runs(tmp_path: Path) -> None:
    study = yaml.safe_load(TEST_STUDY.read_text())
    study["strategies"] |= yaml.safe_load(readme_block("**A new strategy**", "yaml"))
    study["strategies"].pop("aux_free")  # the user's study has only their own aux-free run
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(study))
    runs = []
    for strategy in load_study(path).strategies:
        run = tmp_path / strategy / "seed~0"
        args = ["resolve", "--study", str(path), "--dataset", "shakespeare", "--strategy",
                strategy, "--seed", "0", "--output", str(run / "config.resolved.yaml")]
        assert CliRunner().invoke(app, args).exit_code == 0
        runs.append(run)
    matched = match_settings(load_settings(runs))
    assert matched == {"aux_free_fast": ["lf_t2_free", "v3_free", "v3_t5_free"]}


def test_mlflow_study_run_marks_the_experiment_and_logs_comm_to_each_child(
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    from moebench.report.tracking import init_parent, log_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    # made by an earlier moebench, unmarked
    old = client.create_experiment("mine", (tmp_path / "artifacts").as_uri())
    study = load_study(TEST_STUDY).model_copy(update={"study": "mine"})
    study = study.model_copy(update={"tracking": study.tracking.model_copy(update={"uri": uri})})
    parent = init_parent(study, tmp_path / "parent.txt")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    children = {
        seed: client.create_run(old, run_name=f"aux_free/seed~{seed} (shakespeare)", tags={
            "mlflow.parentRunId": parent, "dataset": "shakespeare", "strategy": "aux_free",
            "seed": str(seed)}).info.run_id
        for seed in (0, 1)
    }
    table = tmp_path / "tables" / "mine.md"
    table.parent.mkdir()
    table.write_text("# Study\n")
    comm = {("shakespeare", "aux_free", 0): {"ib_bytes_per_token": 10.0},
            ("shakespeare", "aux_free", 1): {"ib_bytes_per_token": 12.0}}
    log_study(uri, parent, comm, [table])
    got = {s: client.get_run(r).data.metrics for s, r in children.items()}
    assert got == {0: {"comm.ib_bytes_per_token": 10.0}, 1: {"comm.ib_bytes_per_token": 12.0}}
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.metrics == {}
    assert [a.path for a in client.list_artifacts(parent, "tables")] == ["tables/mine.md"]
