"""A study: a grid of runs (datasets x strategies x seeds) over shared defaults, with its
tracking, comm, resources and report settings. Owned by the pipeline;
`workflow/schemas/study.schema.json` is generated from `StudyConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from moebench.config.errors import describe_errors, format_validation_error
from moebench.config.fields import BIG, NAME_PATTERN, SEED_MAX, Float, Int, Strict, TrackingUri
from moebench.config.loading import deep_merge, read_yaml_mapping
from moebench.config.run import (
    BalanceConfig,
    DataConfig,
    ModelConfig,
    RouterSettings,
    RunConfig,
    TopologyConfig,
    TrainConfig,
)

_OVERRIDABLE = ("model", "topology", "router", "balance", "train")
"""RunConfig sections a study's `base` and its strategies may set."""


def _override_model(cls: type[BaseModel]) -> type[BaseModel]:
    """A copy of `cls` whose fields may all be left out (nested models included).

    Strategy overrides are validated field by field against it (types, ranges, allowed values,
    unknown keys), so both pydantic and the generated JSON schema refuse a bad override before
    it is merged; the merged RunConfig is validated again as a whole (cross-field rules). A
    left-out field defaults to None without validation (`exclude_unset` drops it); an explicit
    null is accepted only where `cls` accepts it."""
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            inner: Any = _override_model(ann)
        else:
            inner = Annotated[ann, *info.metadata] if info.metadata else ann
        fields[name] = (inner, Field(None, description=info.description))
    return create_model(
        f"{cls.__name__}Override",
        __config__=ConfigDict(extra="forbid", frozen=True),
        __doc__=f"Fields of {cls.__name__} to override (unset = inherit).",
        **fields,
    )


StrategyOverride = _override_model(
    create_model(
        "Strategy",
        __config__=ConfigDict(extra="forbid"),
        **{s: (RunConfig.model_fields[s].annotation, ...) for s in _OVERRIDABLE},
    )
)
"""A strategy: a partial RunConfig over model/topology/router/balance/train."""


class RunDefaults(Strict):
    """RunConfig sections shared by every run of a study (strategies override them)."""

    model: ModelConfig = ModelConfig()
    topology: TopologyConfig = TopologyConfig()
    router: RouterSettings = RouterSettings()
    balance: BalanceConfig = BalanceConfig()
    train: TrainConfig = TrainConfig()


class StudyTracking(Strict):
    """MLflow for a study: one experiment, one parent run, one child run per training run."""

    uri: TrackingUri | None = Field(
        "sqlite:///work/mlflow/mlflow.db",
        description="tracking URI (sqlite file or http(s) server); null disables MLflow",
    )
    artifact_location: str | None = Field(
        None,
        description="artifact root of a new experiment; default: <sqlite db dir>/mlruns/"
        "<experiment> for a sqlite store, the server's default for a server",
    )
    experiment: str | None = Field(None, description="experiment name; default: the study name")


class CommSettings(Strict):
    """Payload sizes and link bandwidths with which `moebench comm` turns each run's routing
    trace into bytes and modeled all-to-all time (defaults: [V3] §3.2.2, §3.3.4)."""

    hidden: Int | None = Field(
        None, ge=1, le=BIG, description="elements per token copy; null = the model's d_model"
    )
    dispatch_bytes: Float = Field(
        1.0, gt=0.0, le=64.0, description="bytes per element, dispatch (fp8)"
    )
    combine_bytes: Float = Field(
        2.0, gt=0.0, le=64.0, description="bytes per element, combine (bf16)"
    )
    nvlink_gbps: Float = Field(160.0, gt=0.0, le=1e6, description="NVLink GB/s per GPU")
    ib_gbps: Float = Field(50.0, gt=0.0, le=1e6, description="InfiniBand GB/s per GPU")


class JobResources(Strict):
    """Snakemake resources of one kind of job (SLURM reads them; locally only threads count)."""

    threads: Int = Field(1, ge=1, le=1024)
    mem_mb: Int = Field(2000, ge=100, le=1 << 24)
    runtime: Int = Field(30, ge=1, le=60 * 24 * 30, description="minutes")
    gpu: Int = Field(0, ge=0, le=64, description="GPUs per job (SLURM `gpu` resource)")


class TrainResources(JobResources):
    """Resources of a training job; `threads` also sets torch's CPU threads (per process)."""

    tasks: Int = Field(
        1,
        ge=1,
        le=4096,
        description="processes per run: > 1 trains data + expert parallel, one process per "
        "device of the topology (srun under SLURM, torchrun locally)",
    )
    nodes: Int = Field(1, ge=1, le=1024, description="SLURM nodes per run")
    runs_per_gpu: Int = Field(
        1,
        ge=1,
        le=64,
        description="training runs sharing one GPU under the local executor: `--resources "
        "gpu=G` admits G x runs_per_gpu concurrent runs (SLURM jobs still request `gpu` each)",
    )


class StudyResources(Strict):
    """Per-stage job resources (Snakemake `threads`/`resources`; SLURM reads them)."""

    data: JobResources = JobResources()
    kernels: JobResources = JobResources()
    train: TrainResources = TrainResources()
    comm: JobResources = JobResources()


class ReportSettings(Strict):
    """How `moebench aggregate` compares a study's strategies (docs/statistics.md)."""

    baseline: str | None = Field(
        None,
        description="strategy every other is compared with, seed by seed; null = the first "
        "of aux_free, global_aux, aux_loss the study has, else its first strategy",
    )
    compare_to: dict[str, list[str]] = Field(
        {},
        description="strategy -> the published settings it reproduces (keys of "
        "moebench.report.published.SETTINGS, e.g. lf_t2_free); published claims are checked "
        "on the strategies matched here; empty = each strategy matched by what its config "
        "does (gate, limit, balance terms: moebench.report.published.Recipe)",
    )
    domain_strategies: list[str] = Field(
        [],
        description="strategies drawn in the domain-specialisation figure (empty = every "
        "strategy whose runs record load_by_domain)",
    )

    def check(self, strategies: list[str]) -> None:
        """ValueError naming the field and value unless every name exists."""
        from moebench.report.published import SETTINGS

        named = [("report.baseline", s) for s in [self.baseline] if s is not None]
        named += [("report.compare_to", s) for s in self.compare_to]
        named += [("report.domain_strategies", s) for s in self.domain_strategies]
        for field, name in named:
            if name not in strategies:
                raise ValueError(f"{field}: strategy {name!r} is not in the study ({strategies})")
        seen: dict[str, str] = {}
        for strategy, keys in self.compare_to.items():
            for key in keys:
                if key not in SETTINGS:
                    raise ValueError(
                        f"report.compare_to.{strategy}: {key!r} is not a published setting "
                        f"(allowed: {sorted(SETTINGS)})"
                    )
                if key in seen:
                    raise ValueError(
                        f"report.compare_to: {key!r} is matched by both {seen[key]!r} and "
                        f"{strategy!r} (one strategy per published setting)"
                    )
                seen[key] = strategy


class StudyConfig(Strict):
    """A study file (`configs/*.yaml`): the grid datasets x strategies x seeds over `base`.

    `run_config(dataset, strategy, seed)` deep-merges `base` with the strategy's override and
    validates the result as a RunConfig; every grid point is checked when the study loads, so
    a bad strategy is refused before any job starts."""

    study: str = Field(pattern=NAME_PATTERN, description="name: <output root>/runs/<study>/...")
    seeds: list[Annotated[Int, Field(ge=0, le=SEED_MAX)]] = Field(min_length=1)
    datasets: dict[Annotated[str, Field(pattern=NAME_PATTERN)], DataConfig] = Field(
        min_length=1
    )
    strategies: dict[Annotated[str, Field(pattern=NAME_PATTERN)], StrategyOverride] = Field(  # type: ignore[valid-type]
        min_length=1
    )
    base: RunDefaults = RunDefaults()
    tracking: StudyTracking = StudyTracking()
    comm: CommSettings = CommSettings()
    resources: StudyResources = StudyResources()
    report: ReportSettings = ReportSettings()

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _grid_valid(self) -> StudyConfig:
        tasks = self.resources.train.tasks
        for dataset in self.datasets:
            for strategy in self.strategies:
                cfg = self.run_config(dataset, strategy, self.seeds[0])
                devices, batch = cfg.topology.num_devices, cfg.train.batch_size
                if tasks > 1 and (tasks != devices or batch % tasks):
                    raise ValueError(
                        f"resources.train.tasks={tasks} must be 1 or the {devices} devices of "
                        f"strategy {strategy!r}'s topology, and divide train.batch_size={batch}"
                    )
        self.report.check(list(self.strategies))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form that validates back to an equal study (unset overrides left out)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def grid(self) -> list[tuple[str, str, int]]:
        """Every (dataset, strategy, seed) of the study, sorted: its run directories."""
        return [
            (d, s, n)
            for d in sorted(self.datasets)
            for s in sorted(self.strategies)
            for n in sorted(self.seeds)
        ]

    @property
    def experiment(self) -> str:
        """MLflow experiment name of this study."""
        return self.tracking.experiment or self.study

    def data_dir(self, dataset: str) -> str:
        """Where `moebench data` writes the token streams of `dataset` for this study."""
        from moebench.report.paths import data_dir

        return str(data_dir(self.study, dataset))

    def data_config(self, dataset: str) -> RunConfig:
        """The config `moebench data` reads for `dataset`: base settings, its data section."""
        if dataset not in self.datasets:
            raise ValueError(
                f"dataset={dataset!r} is not in the study (allowed: {list(self.datasets)})"
            )
        return RunConfig.model_validate(
            self.base.model_dump()
            | {
                "study": self.study,
                "dataset": dataset,
                "data_dir": self.data_dir(dataset),
                "data": self.datasets[dataset].model_dump(),
            }
        )

    def run_config(self, dataset: str, strategy: str, seed: int) -> RunConfig:
        """The resolved config of one run: base <- strategy override, plus its identity."""
        for kind, name, known in (
            ("dataset", dataset, self.datasets),
            ("strategy", strategy, self.strategies),
        ):
            if name not in known:
                raise ValueError(f"{kind}={name!r} is not in the study (allowed: {list(known)})")
        if seed not in self.seeds:
            raise ValueError(f"seed={seed} is not in the study (allowed: {self.seeds})")
        raw = deep_merge(
            self.base.model_dump(), self.strategies[strategy].model_dump(exclude_unset=True)
        )
        raw["train"]["threads"] = self.resources.train.threads
        raw |= {
            "study": self.study,
            "dataset": dataset,
            "strategy": strategy,
            "seed": seed,
            "data_dir": self.data_dir(dataset),
            "data": self.datasets[dataset].model_dump(),
            "tracking": {"uri": self.tracking.uri, "experiment": self.experiment},
        }
        try:
            return RunConfig.model_validate(raw)
        except ValidationError as err:
            raise ValueError(
                f"strategy {strategy!r} (dataset {dataset!r}) gives an invalid run config: "
                + "; ".join(describe_errors(err, RunConfig))
            ) from None


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study YAML; ValueError naming the file, field and value if bad."""
    return study_from_dict(read_yaml_mapping(Path(path), "study file"), str(path))


def study_from_dict(raw: dict[str, Any], where: str = "study config") -> StudyConfig:
    """Validate a study mapping (e.g. Snakemake's `config`); ValueError listing every problem."""
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, StudyConfig, where)) from None
