# Study config -> grid, paths and helpers shared by the rule files (no rules here).
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import update_config, validate

from moebench.config import RunConfig, read_yaml_mapping, study_from_dict
from moebench.report import paths
from moebench.report.study import (
    grid_override_problem,
    typed_overrides,
    write_conda_env,
    write_study_copy,
)


# 0. The study files read again strictly (Snakemake's YAML loader keeps the last of two equal
#    keys, e.g. a repeated strategy name); 1. JSON schema (types, ranges, allowed values,
#    unknown keys, strategy overrides field by field); 2. pydantic: cross-field rules of every
#    grid point's RunConfig.
STUDY_FILES = workflow.overwrite_configfiles or [Path(workflow.basedir, "configs/default.yaml")]
#    `--config` values are read again with their YAML types (Snakemake reads nested ones as
#    strings) and may not add datasets or strategies to a study without renaming it.
try:
    FILE_CONFIG = {}
    for study_path in STUDY_FILES:
        update_config(FILE_CONFIG, read_yaml_mapping(Path(study_path), "study file"))
    OVERRIDES = typed_overrides(workflow.config_settings.config)
except ValueError as err:
    raise WorkflowError(str(err)) from None
if problem := grid_override_problem(FILE_CONFIG, OVERRIDES):
    raise WorkflowError(problem)
update_config(config, OVERRIDES)
validate(config, "../schemas/study.schema.json", set_default=False)
try:
    STUDY = study_from_dict(config, "study config (configfile + --config)")
except ValueError as err:
    raise WorkflowError(str(err)) from None

STUDY_NAME = STUDY.study
DATASETS = sorted(STUDY.datasets)
TRACKING = STUDY.tracking.uri is not None
# The validated study as the rules' `moebench` calls read it (configfile + --config).
STUDY_FILE = str(write_study_copy(STUDY))


def conda_env() -> str:
    """The rules' `conda:` environment: environment.yml, or under `--sdm conda` its copy that
    installs this checkout by path (written only then: `write_conda_env`)."""
    settings = workflow.deployment_settings
    if settings is not None and DeploymentMethod.CONDA in settings.deployment_method:
        return str(write_conda_env(Path(workflow.basedir)))
    return "../../environment.yml"


ENV = conda_env()
# Jobs find the tools installed beside the interpreter running Snakemake (moebench, torchrun)
# at the end of PATH, locally and in SLURM jobs (srun passes PATH on): no activated
# environment needed. (At the end, so a test's wrapper earlier on PATH still comes first.)
shell.prefix(f"set -euo pipefail; export PATH=$PATH:{shlex.quote(str(Path(sys.executable).parent))}; ")


wildcard_constraints:
    study=re.escape(STUDY_NAME),
    dataset="[A-Za-z0-9][A-Za-z0-9_.-]*",
    strategy="[A-Za-z0-9][A-Za-z0-9_.-]*",
    seed=r"\d+",


W = ("{study}", "{dataset}", "{strategy}", "{seed}")
COMM_FILES = ("comm.parquet", "comm.json")
TRAIN_FILES = tuple(f for f in paths.RUN_FILES if f not in COMM_FILES)
DATA_FILES = ("train.bin", "val.bin", "manifest.json", "tokenizer.json")


def run_patterns(names) -> list[str]:
    """`names` in the run directory pattern <out>/runs/{study}/{dataset}/{strategy}/seed~{seed}."""
    return [str(paths.run_dir(*W) / name) for name in names]


def data_patterns() -> list[str]:
    """The token files of the data directory pattern <out>/data/{study}/{dataset}."""
    return [str(paths.data_dir("{study}", "{dataset}") / name) for name in DATA_FILES]


def parent_dir(wildcards, output) -> str:
    """The folder of a job's first output (a run or data directory)."""
    return str(Path(output[0]).parent)


def digest(cfg: RunConfig) -> str:
    """Short hash of a resolved config: as a rule param it reruns exactly the jobs whose
    config changed (Snakemake's params rerun trigger), not every job of the study."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_digest(wildcards) -> str:
    return digest(STUDY.run_config(wildcards.dataset, wildcards.strategy, int(wildcards.seed)))


def data_digest(wildcards) -> str:
    return digest(STUDY.data_config(wildcards.dataset))


def data_files(wildcards) -> list[str]:
    """The token files a run of `wildcards.dataset` trains on."""
    folder = paths.data_dir(STUDY_NAME, wildcards.dataset)
    return [str(folder / f) for f in DATA_FILES]


def tracking_inputs(wildcards) -> dict[str, object]:
    """The study's MLflow parent-run file (ancient: recreating it retrains nothing)."""
    if not TRACKING:
        return {}
    return {"parent": ancient(str(paths.parent_run_file(STUDY_NAME)))}


def parent_run_arg(wildcards) -> str:
    """`--set tracking.parent_run_id=...` read from the parent-run file at run time (quoted
    as a YAML string), or nothing when MLflow is off."""
    if not TRACKING:
        return ""
    parent = paths.parent_run_file(STUDY_NAME)
    return f"--set \"tracking.parent_run_id='$(cat {parent})'\""


def resources_of(stage: str) -> dict[str, int | str]:
    """Snakemake resources of a stage from the study's `resources:` section; a distributed
    training declares its tasks and nodes and launches through `mpi` (srun); runs sharing
    a GPU take a `gpu_slots` unit instead of a whole `gpu` (see `share_gpus`)."""
    spec = getattr(STUDY.resources, stage)
    out: dict[str, int | str] = {
        "mem_mb": spec.mem_mb,
        "runtime": spec.runtime,
        "gpu": spec.gpu,
        "cpus_per_task": spec.threads,
    }
    if getattr(spec, "tasks", 1) > 1:
        out |= {"tasks": spec.tasks, "nodes": spec.nodes, "mpi": "srun"}
    if GPU_SHARING and stage == "train" and spec.gpu:
        out |= {"gpu": 0, "gpu_slots": 1}
    return out


def share_gpus() -> bool:
    """Several training runs per GPU (`resources.train.runs_per_gpu` > 1, not under SLURM,
    whose jobs each request their GPUs): `--resources gpu=G` then admits
    G x runs_per_gpu training runs at once, each holding one `gpu_slots` unit (Snakemake
    resources are integers, so a run cannot hold a fraction of a `gpu`). Without
    `--resources gpu=...` nothing limits them, as for a whole-GPU run."""
    runs = STUDY.resources.train.runs_per_gpu
    plugin = workflow.executor_plugin
    if runs == 1 or (plugin is not None and plugin.name == "slurm"):
        return False
    given = workflow.global_resources
    if "gpu" in given and "gpu_slots" not in given:
        workflow.register_resource("gpu_slots", given.get("gpu").value * runs)
    return True


GPU_SHARING = share_gpus()


def train_launcher(wildcards, resources) -> str:
    """Command prefix of a training run: none for one process; for several, `srun -n N`
    inside a SLURM job (the `mpi` resource) and `torchrun` elsewhere (chosen at run time)."""
    tasks = STUDY.resources.train.tasks
    if tasks == 1:
        return ""
    srun = f"{resources.mpi} -n {tasks} --kill-on-bad-exit=1"
    torchrun = f"torchrun --no-python --standalone --nproc-per-node {tasks}"
    return f'$(if [ -n "${{SLURM_JOB_ID:-}}" ]; then echo "{srun}"; else echo "{torchrun}"; fi)'


def log_of(step: str) -> str:
    """Log file pattern of a rule's job (`step`: the rule name and the job's sub-path)."""
    return str(paths.log_file("{study}", step))


def run_files(names) -> list[str]:
    """`names` in every run directory of the study grid."""
    return [str(paths.run_dir(STUDY_NAME, d, s, n) / f) for d, s, n in STUDY.grid() for f in names]


def slurm_partition_problem() -> str | None:
    """Why SLURM jobs would have no partition, or None: the executor is slurm, neither the
    default resources nor any rule set `slurm_partition`, and `sinfo` shows no default
    partition (marked `*`). Checked at start, before any job is submitted."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return None
    defaults = workflow.resource_settings.default_resources or {}
    if "slurm_partition" in defaults or any(
        "slurm_partition" in rule.resources for rule in workflow.rules
    ):
        return None
    if shutil.which("sinfo"):
        res = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
        if any(p.endswith("*") for p in res.stdout.split()):
            return None
    return "slurm_partition is not set (default-resources) and the cluster has no default partition"


def memory_problem() -> str | None:
    """Why some runs of the study cannot fit the device they would train on, or None: known
    only where jobs run on this machine (the local executor; a SLURM job's node is chosen by
    the cluster, and each run checks its own device first). `moebench fits` runs in its own
    process, so Snakemake's holds no CUDA context for the whole workflow."""
    if not workflow.local_exec:
        return None
    res = subprocess.run(
        [sys.executable, "-m", "moebench", "fits", "--study", STUDY_FILE],
        capture_output=True, text=True,
    )
    return res.stderr.strip().removeprefix("error: ") if res.returncode else None


def log_warnings() -> list[str]:
    """The distinct warning lines of the study's job logs (a small corpus, many epochs, ...),
    each with the number of jobs that printed it, so a run that ends well still shows them."""
    from collections import Counter

    from moebench.cli import WARNING_MARK

    found = Counter(
        line
        for log in sorted(paths.log_file(STUDY_NAME, "x").parent.rglob("*.log"))
        for line in set(log.read_text(errors="replace").splitlines())
        if f"] {WARNING_MARK}" in line
    )
    return [f"{line} ({n} jobs)" if n > 1 else line for line, n in sorted(found.items())]
