"""Typed configuration of one training run and of a study (a grid of runs).

Every field is validated before any work starts: unknown keys are refused (`extra="forbid"`),
numbers and booleans are strict and bounded, enumerations are `Literal`s, so errors name the
field, the value and the allowed values. One module per concept: `fields` (strict types and
bounds), `run` (the run schema), `errors` (messages), `loading` (YAML and `--set`), `study`
(the grid; `moebench schema` generates the study files' JSON schema from `StudyConfig`).
"""

from moebench.config.errors import describe_errors, format_validation_error, shown
from moebench.config.fields import BIG, NAME_PATTERN, SEED_MAX, Bool, Float, Int, Strict
from moebench.config.loading import (
    deep_merge,
    load_run_config,
    parse_overrides,
    read_yaml,
    read_yaml_mapping,
)
from moebench.config.run import (
    LIMITS,
    BalanceConfig,
    BiasConfig,
    CapacityConfig,
    DataConfig,
    Limit,
    ModelConfig,
    RouterSettings,
    RunConfig,
    TopologyConfig,
    TrackingConfig,
    TrainConfig,
    check_router,
    default_normalize,
    routing_groups,
)
from moebench.config.study import (
    CommSettings,
    JobResources,
    ReportSettings,
    RunDefaults,
    StrategyOverride,
    StudyConfig,
    StudyResources,
    StudyTracking,
    TrainResources,
    load_study,
    study_from_dict,
)

__all__ = [
    "BIG",
    "LIMITS",
    "NAME_PATTERN",
    "SEED_MAX",
    "BalanceConfig",
    "BiasConfig",
    "Bool",
    "CapacityConfig",
    "CommSettings",
    "DataConfig",
    "Float",
    "Int",
    "JobResources",
    "Limit",
    "ModelConfig",
    "ReportSettings",
    "RouterSettings",
    "RunConfig",
    "RunDefaults",
    "StrategyOverride",
    "Strict",
    "StudyConfig",
    "StudyResources",
    "StudyTracking",
    "TopologyConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainResources",
    "check_router",
    "deep_merge",
    "default_normalize",
    "describe_errors",
    "format_validation_error",
    "load_run_config",
    "load_study",
    "parse_overrides",
    "read_yaml",
    "read_yaml_mapping",
    "routing_groups",
    "shown",
    "study_from_dict",
]
