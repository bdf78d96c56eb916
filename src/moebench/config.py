"""Typed configuration of one training run and of a study (a grid of runs).

Every field is validated before any work starts: unknown keys are refused (`extra="forbid"`),
enumerations are `Literal`s, so errors name the field, the value and the allowed values.
The JSON schema that Snakemake validates study files against is generated from `StudyConfig`
(`moebench schema`), and a test keeps the committed schema in sync.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic import Strict as StrictType

if TYPE_CHECKING:
    from moebench.model import TransformerConfig
    from moebench.routing import Layout, RouterConfig

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Study, dataset and strategy names become path parts and Snakemake wildcards."""


Int = Annotated[int, StrictType()]
"""An integer as written: a bool (`yes`), a float or a string is refused, not coerced."""
Float = Annotated[float, StrictType(), AllowInfNan(False)]
"""A finite number: an int is taken, a bool (`yes` -> 1.0), a string, NaN or inf is refused."""
Bool = Annotated[bool, StrictType()]
"""true or false: 1, 0 or the string "true" is refused."""

SEED_MAX = 2**31 - 2
"""Largest seed: seed + 1 (the drop seed) still fits a signed 32-bit integer."""
BIG = 1 << 20
"""Upper bound of sizes (widths, counts, tokens): far above any CPU or single-node study; a
refusal names the bound, which is a choice made here (raise it in moebench/config.py)."""


class Strict(BaseModel):
    """Base: unknown keys are errors, assignment is validated, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(Strict):
    """Where the token streams come from (see `moebench.data`)."""

    source: Literal["shakespeare", "cpython", "synthetic", "file", "hf", "mixed"] = Field(
        "shakespeare", description="mixed: Shakespeare + CPython + synthetic topics, each "
        "window from one domain (moebench.data.sources)"
    )
    path: str | None = Field(None, description="text file or folder of them (source=file)")
    hf_name: str | None = Field(None, description="Hugging Face dataset name for source=hf")
    vocab_size: Int = Field(1024, ge=260, le=262144, description="byte-level BPE vocabulary")
    val_fraction: Float = Field(0.1, gt=0.0, lt=0.5, description="documents held out")
    max_bytes: Int | None = Field(
        None, gt=0, le=1 << 40, description="cap on corpus bytes (fast tests); per domain for mixed"
    )
    # synthetic source: topics drawn from Zipf(skew); each topic is a Markov source
    synthetic_topics: Int = Field(16, ge=1, le=4096)
    synthetic_skew: Float = Field(1.2, ge=0.0, le=100.0, description="Zipf exponent over topics")
    synthetic_docs: Int = Field(400, ge=2, le=BIG)
    synthetic_doc_tokens: Int = Field(512, ge=16, le=1 << 16)

    @model_validator(mode="after")
    def _source_args(self) -> DataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("data.path is required when data.source='file'")
        if self.source == "hf" and not self.hf_name:
            raise ValueError("data.hf_name is required when data.source='hf'")
        return self


class ModelConfig(Strict):
    """DeepSeekMoE decoder shape (see `moebench.model`)."""

    d_model: Int = Field(128, ge=8, le=1 << 16)
    n_layers: Int = Field(4, ge=1, le=1024)
    n_heads: Int = Field(4, ge=1, le=1024)
    n_dense_layers: Int = Field(1, ge=0, le=1024)
    dense_hidden: Int = Field(512, ge=1, le=BIG)
    n_shared_experts: Int = Field(1, ge=0, le=64)
    expert_hidden: Int = Field(64, ge=1, le=BIG)
    init_std: Float = Field(0.02, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:  # checked here too, so a study refuses it
            raise ValueError(
                f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even "
                f"for RoPE; got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"model.n_dense_layers={self.n_dense_layers} exceeds model.n_layers={self.n_layers}"
            )
        return self


class TopologyConfig(Strict):
    """Expert-parallel layout: experts in contiguous blocks on GPUs, GPUs in nodes."""

    num_nodes: Int = Field(4, ge=1, le=1024)
    gpus_per_node: Int = Field(2, ge=1, le=64)

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.gpus_per_node


def default_normalize(score_fn: str, top_k: int) -> bool:
    """Whether gates are divided by their sum when `normalize` is unset: yes for sigmoid with
    K > 1 (DeepSeek-V3, Megatron-Core), no for softmax (Switch, V2); docs/routing.md §3."""
    return score_fn == "sigmoid" and top_k != 1


Limit = Literal["none", "device", "node"]
"""What a routing group is: nothing (no limit), a device ([V2] §2.2.2) or a node ([V3] §2.1.2)."""
LIMITS: tuple[str, ...] = get_args(Limit)


def routing_groups(limit: str, num_nodes: int, gpus_per_node: int) -> int:
    """G, the groups of the group-limited router: devices, nodes, or 1 (no limit)."""
    return {"none": 1, "device": num_nodes * gpus_per_node, "node": num_nodes}[limit]


class RouterSettings(Strict):
    """Router options; `limit` picks what a group is (device for V2, node for V3)."""

    num_experts: Int = Field(16, ge=1, le=4096)
    top_k: Int = Field(4, ge=1, le=256)
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    limit: Limit = "none"
    group_limit: Int | None = Field(
        None, ge=1, le=1024, description="M: max devices/nodes per token; null = all (no limit)"
    )
    group_score: Literal["max", "top2_sum", "topk_sum"] = "max"
    normalize: Bool | None = Field(
        None, description="divide the K gates by their sum; null = yes for sigmoid with K > 1"
    )
    route_scale: Float = Field(1.0, gt=0.0, le=100.0)


class BiasConfig(Strict):
    """Aux-loss-free bias ([V3] §2.1.2, [LF] Alg. 1)."""

    enabled: Bool = False
    rate: Float = Field(1e-3, ge=0.0, le=10.0)
    rule: Literal["sign", "proportional", "multiplicative"] = "sign"
    freeze_frac: Float = Field(1.0, gt=0.0, le=1.0, description="rate drops to 0 after this")
    recenter: Bool = False



class CapacityConfig(Strict):
    """Token dropping ([Switch] eq. 3, [V2] §2.2.4). factor=None means no dropping."""

    factor: Float | None = Field(None, gt=0.0, le=1000.0)
    policy: Literal["probs", "position"] = "probs"
    level: Literal["expert", "device"] = "expert"
    protected_frac: Float = Field(0.0, ge=0.0, le=1.0)


class BalanceConfig(Strict):
    """Coefficients of every balance loss (0 = off) plus bias and capacity settings."""

    switch_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[Switch] eq. 4 (code form)")
    expert_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[V2] eq. 23, per sequence")
    device_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[V2] eq. 26")
    comm_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[V2] eq. 29")
    seq_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[V3] eq. 17, per sequence")
    global_alpha: Float = Field(
        0.0, ge=0.0, le=1000.0, description="[V3] §4.5.3 batch-wise form; f from the optimizer "
        "step's running count over micro-batches and ranks (docs/global_loss.md)"
    )
    z_alpha: Float = Field(0.0, ge=0.0, le=1000.0, description="[ST-MoE] eq. 5 router z-loss")
    aux_counts: Literal["literal", "actual"] = Field(
        "literal", description="f_i from the plain unbiased top-K or the routing performed"
    )
    bias: BiasConfig = BiasConfig()
    capacity: CapacityConfig = CapacityConfig()


class TrainConfig(Strict):
    """Optimisation and bookkeeping of one run (see `moebench.train`)."""

    steps: Int = Field(200, ge=1, le=1 << 30)
    batch_size: Int = Field(16, ge=1, le=BIG, description="sequences per micro-batch")
    grad_accum: Int = Field(1, ge=1, le=1 << 16)
    seq_len: Int = Field(64, ge=2, le=BIG)
    lr: Float = Field(3e-3, gt=0.0, le=10.0)
    min_lr_frac: Float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: Int = Field(20, ge=0, le=1 << 30)
    weight_decay: Float = Field(0.1, ge=0.0, le=10.0)
    beta1: Float = Field(0.9, ge=0.0, lt=1.0)
    beta2: Float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: Float = Field(1.0, gt=0.0, le=1e6)
    eval_every: Int = Field(50, ge=1, le=1 << 30)
    eval_batches: Int = Field(8, ge=1, le=BIG)
    log_every: Int = Field(10, ge=1, le=1 << 30)
    ckpt_every: Int = Field(50, ge=1, le=1 << 30)
    keep_ckpt: Bool = Field(
        True, description="keep the last checkpoint once the run is complete; false deletes "
        "it after summary.json is written (saves disk in large studies)"
    )
    trace_tokens: Int = Field(
        4096, ge=1, le=1 << 24, description="validation tokens in routing_trace"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Int = Field(
        1, ge=1, le=1024, description="torch CPU threads (1 = bitwise reproducible)"
    )
    compile: Bool = Field(False, description="torch.compile the dense parts (CUDA training)")


class TrackingConfig(Strict):
    """MLflow: None disables it; files stay the source of truth."""

    uri: str | None = None
    experiment: str = "moebench"
    parent_run_id: str | None = None


class RunConfig(Strict):
    """Everything `moebench train` needs: the resolved config of one run."""

    study: str = Field("adhoc", pattern=_NAME_PATTERN)
    dataset: str = Field("shakespeare", pattern=_NAME_PATTERN)
    strategy: str = Field("none", pattern=_NAME_PATTERN)
    seed: Int = Field(0, ge=0, le=SEED_MAX)
    data_dir: str = Field("work/data/shakespeare", description="output of `moebench data`")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    topology: TopologyConfig = TopologyConfig()
    router: RouterSettings = RouterSettings()
    balance: BalanceConfig = BalanceConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_router_defaults(cls, data: Any) -> Any:
        """Unset `router.normalize` and `router.group_limit` take their per-run defaults
        (`default_normalize`; M = every group, no limit), so config.resolved.yaml states
        the gate rule and the M the run used."""
        if not isinstance(data, dict):
            return data
        router, topology = (data.get(key, {}) for key in ("router", "topology"))
        router, topology = (x.model_dump() if isinstance(x, BaseModel) else x
                            for x in (router, topology))
        if not isinstance(router, dict) or not isinstance(topology, dict):
            return data  # field validation names the problem
        r = {k: f.default for k, f in RouterSettings.model_fields.items()} | router
        t = {k: f.default for k, f in TopologyConfig.model_fields.items()} | topology
        resolved = dict(router)
        if router.get("normalize") is None:
            resolved["normalize"] = default_normalize(r["score_fn"], r["top_k"])
        sizes_ok = all(type(t[k]) is int for k in ("num_nodes", "gpus_per_node"))
        if router.get("group_limit") is None and sizes_ok and r["limit"] in LIMITS:
            resolved["group_limit"] = routing_groups(r["limit"], t["num_nodes"], t["gpus_per_node"])
        return {**data, "router": resolved}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        r, t = self.router, self.topology
        if r.top_k > r.num_experts:
            raise ValueError(
                f"router.top_k={r.top_k} exceeds router.num_experts={r.num_experts} "
                f"(allowed: 1..{r.num_experts})"
            )
        for name, n in (("num_nodes", t.num_nodes), ("num_devices", t.num_devices)):
            if r.num_experts % n:
                raise ValueError(
                    f"router.num_experts={r.num_experts} must be divisible by topology.{name}={n} "
                    f"(allowed: multiples of {n})"
                )
        groups = self.num_groups
        if r.limit != "none" and r.group_limit > groups:
            raise ValueError(
                f"router.group_limit={r.group_limit} exceeds the {groups} "
                f"{r.limit}s of the topology (allowed: 1..{groups})"
            )
        reachable = r.group_limit * (r.num_experts // groups)
        if r.limit != "none" and r.top_k > reachable:
            raise ValueError(
                f"router.top_k={r.top_k} exceeds group_limit x experts per {r.limit} "
                f"= {reachable} (allowed: 1..{reachable})"
            )
        if self.balance.bias.rule == "multiplicative" and r.score_fn != "sigmoid":
            raise ValueError("balance.bias.rule='multiplicative' needs router.score_fn='sigmoid'")
        return self

    @property
    def num_groups(self) -> int:
        """Groups of the group-limited router: devices, nodes, or 1 (no limit)."""
        t = self.topology
        return routing_groups(self.router.limit, t.num_nodes, t.gpus_per_node)

    def router_config(self) -> RouterConfig:
        """The router of every MoE layer: groups are devices (limit=device, [V2] §2.2.2) or
        nodes (limit=node, [V3] §2.1.2) of the topology; "mul" bias for the multiplicative
        rule."""
        from moebench.routing import RouterConfig

        r = self.router
        return RouterConfig(
            num_experts=r.num_experts,
            top_k=r.top_k,
            score_fn=r.score_fn,
            num_groups=self.num_groups,
            group_limit=r.group_limit if self.num_groups > 1 else 1,
            group_score=r.group_score,
            normalize=r.normalize,
            route_scale=r.route_scale,
            bias_mode="mul" if self.balance.bias.rule == "multiplicative" else "add",
        )

    def layout(self) -> Layout:
        """The modelled expert placement: contiguous blocks of experts per GPU."""
        from moebench.routing import Layout

        t = self.topology
        return Layout.contiguous(self.router.num_experts, t.num_nodes, t.gpus_per_node)

    def transformer_config(self, vocab_size: int) -> TransformerConfig:
        """The decoder this run trains, for a vocabulary of `vocab_size`: the config composes
        the model's own config, the model never reads the run config."""
        from moebench.model import MoEConfig, TransformerConfig

        m, r = self.model, self.router
        moe = MoEConfig(
            d_model=m.d_model,
            expert_hidden=m.expert_hidden,
            n_shared_experts=m.n_shared_experts,
            router=self.router_config(),
            layout=self.layout(),
            balance=self.balance,
            comm_limit=r.group_limit if r.limit == "device"
            else min(r.top_k, self.topology.num_devices),
        )
        return TransformerConfig(
            vocab_size=vocab_size,
            max_seq_len=self.train.seq_len,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            n_dense_layers=m.n_dense_layers,
            dense_hidden=m.dense_hidden,
            init_std=m.init_std,
            moe=moe,
            drop_seed=self.seed + 1,
        )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `a.b=1` strings into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = read_yaml(raw, f"--set {item!r}")
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently) and reads `1e-3` as a number, as YAML 1.2 does (PyYAML reads it as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} is given twice (lines {seen[key]} and {line}); "
                    "allowed: each key once per mapping", key_node.start_mark,
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxdict = 4
_SHOWN.maxlevel = 1


def shown(value: Any) -> str:
    """A short repr of a user's value for a message: bounded in length and time (a YAML alias
    bomb is never walked in full)."""
    return _SHOWN.repr(value)


def read_yaml(text: str, where: str) -> Any:
    """Parse YAML strictly (`_StrictLoader`); a syntax error or a repeated key becomes a
    ValueError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{where} is not valid YAML{at}: {reason}") from None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a config or study file holds; ValueError if it is missing, not YAML, empty
    or not a mapping (an empty file would otherwise run every default)."""
    where = f"{what} {path}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist")
    raw = read_yaml(path.read_text(), where)
    if raw is None:
        raise ValueError(f"{where} is empty; allowed: a YAML mapping of settings")
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a mapping, got {type(raw).__name__}")
    return raw


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """`Annotated[X, ...]` -> X; `M | None` -> the pydantic model M of a union (else None)."""
    while get_origin(tp) in (Union, types.UnionType, Annotated):
        args = get_args(tp)
        tp = args[0] if get_origin(tp) is Annotated else next(filter(_is_model, args), None)
    return tp


def _model_at(model: Any, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model reached from `model` along a validation-error location (dict keys
    are stepped over); None if the path leaves the models."""
    model = _unwrap(model)
    for part in path:
        if _is_model(model):
            field = model.model_fields.get(str(part))
            model = field.annotation if field is not None else None
        elif get_origin(model) is dict:
            model = get_args(model)[1]
        else:
            return None
        model = _unwrap(model)
    return model if _is_model(model) else None


def _unknown_key_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """"; allowed keys: ...; did you mean ...?" for an unknown key at `loc` (a typo)."""
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return ""
    allowed = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"; allowed keys: {', '.join(allowed)}{guess}"


def describe_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """`field: reason (got value)` per problem of validating `model`; cross-field (model-level)
    problems give their own message, which names the fields; unknown keys list the allowed."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        got = "" if not loc or isinstance(value, dict) else f" (got {shown(value)})"
        hint = _unknown_key_hint(model, e["loc"]) if e["type"] == "extra_forbidden" else ""
        if e["type"] == "less_than_equal" and e.get("ctx", {}).get("le", 0) > 1:
            hint = "; the bound is a choice of moebench/config.py, raise it there if needed"
        named = not loc or msg.startswith(loc)  # a validator's message names field and value
        out.append(msg if named else f"{loc}: {msg}{got}{hint}")
    return out


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem of a RunConfig (see `describe_errors`)."""
    return "\n".join([f"invalid {where}:", *(f"  {p}" for p in describe_errors(err, RunConfig))])


def load_run_config(path: Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config YAML (or defaults) and apply `--set` overrides; ValueError if bad."""
    raw = read_yaml_mapping(Path(path), "config file") if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        where = f"run config {path or '(defaults)'}"
        raise ValueError(format_validation_error(err, where)) from None


# ---------------------------------------------------------------------------------------------
# Study: a grid of runs (datasets x strategies x seeds) over shared defaults. Owned by the
# pipeline; `workflow/schemas/study.schema.json` is generated from `StudyConfig`.

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

    uri: str | None = Field(
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

    study: str = Field(pattern=_NAME_PATTERN, description="name: <output root>/runs/<study>/...")
    seeds: list[Annotated[Int, Field(ge=0, le=SEED_MAX)]] = Field(min_length=1)
    datasets: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], DataConfig] = Field(
        min_length=1
    )
    strategies: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], StrategyOverride] = Field(  # type: ignore[valid-type]
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
        raise ValueError(
            f"invalid {where}:\n  " + "\n  ".join(describe_errors(err, StudyConfig))
        ) from None
