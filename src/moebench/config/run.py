"""The schema of one training run (`RunConfig`) and its sections: data, model, topology,
router, balance, train, tracking. Cross-field rules live in `RunConfig`, so a study is refused
before any job for anything a run would refuse; `RunConfig` builds the runtime objects (the
router, the layout, the model's own config)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from moebench.config.fields import (
    BIG,
    NAME_PATTERN,
    SEED_MAX,
    Bool,
    Float,
    Int,
    Strict,
    TrackingUri,
)

if TYPE_CHECKING:
    from moebench.model import TransformerConfig
    from moebench.routing import Layout, RouterConfig


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
    """Expert-parallel layout: experts in contiguous blocks on GPUs, GPUs in nodes, and how
    a distributed run's all-to-all moves tokens between them."""

    num_nodes: Int = Field(4, ge=1, le=1024)
    gpus_per_node: Int = Field(2, ge=1, le=64)
    dispatcher: Literal["per_expert", "dedup"] = Field(
        "per_expert", description="per_expert: one row per (token, expert) to the expert's "
        "rank; dedup: one row per (token, node), then per (token, rank) inside the node"
    )
    a2a_capacity_factor: Float | None = Field(
        None, gt=0.0, le=1024.0, description="per_expert only; unset: exact all-to-all "
        "sizes (one host sync per MoE layer); set: each rank pair exchanges a fixed "
        "ceil(factor T K / W) rows, padded, with no host sync, and drops rows beyond it "
        "(none at factor >= W, the real ranks)"
    )

    @model_validator(mode="after")
    def _padded_per_expert(self) -> TopologyConfig:
        if self.a2a_capacity_factor is not None and self.dispatcher != "per_expert":
            raise ValueError(
                f"topology.a2a_capacity_factor={self.a2a_capacity_factor} is invalid with "
                f"topology.dispatcher={self.dispatcher!r}; allowed: unset, or "
                "dispatcher='per_expert'"
            )
        return self

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


def check_router(
    num_experts: int, top_k: int, num_groups: int, group_limit: int, group_score: str
) -> None:
    """The router's cross-field rules, stated once: `RouterConfig` checks itself with them
    and `RunConfig` checks a run's router (G from its topology) before any work. ValueError
    naming the fields (bare names: `RunConfig` prefixes `router.`) and what is allowed."""
    if top_k > num_experts:
        raise ValueError(
            f"top_k={top_k} exceeds num_experts={num_experts}; allowed: 1..{num_experts}"
        )
    if num_experts % num_groups:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"num_experts={num_experts} is not divisible by num_groups={num_groups}; "
            f"allowed num_groups: {divisors}"
        )
    if num_groups == 1:
        return
    if group_limit > num_groups:
        raise ValueError(
            f"group_limit={group_limit} exceeds num_groups={num_groups}; allowed: 1..{num_groups}"
        )
    per_group = num_experts // num_groups
    reachable = group_limit * per_group
    if top_k > reachable:
        raise ValueError(
            f"top_k={top_k} exceeds group_limit x experts per group = {group_limit} x "
            f"{per_group} = {reachable}; allowed: 1..{reachable}"
        )
    if group_limit == num_groups:  # M = G: plain top-K, the group score is never used
        return
    if group_score == "top2_sum" and per_group < 2:
        raise ValueError(
            f"group_score='top2_sum' needs >= 2 experts per group, got {per_group} "
            f"(num_experts={num_experts}, num_groups={num_groups}); allowed group_score "
            "here: 'max', 'topk_sum'"
        )
    if group_score == "topk_sum" and top_k < group_limit:
        raise ValueError(
            f"group_score='topk_sum' sums the top top_k // group_limit = {top_k} // "
            f"{group_limit} = 0 scores; allowed: top_k >= group_limit, or group_score 'max' / "
            "'top2_sum'"
        )


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

    uri: TrackingUri | None = None
    experiment: str = "moebench"
    parent_run_id: str | None = None


class RunConfig(Strict):
    """Everything `moebench train` needs: the resolved config of one run."""

    study: str = Field("adhoc", pattern=NAME_PATTERN)
    dataset: str = Field("shakespeare", pattern=NAME_PATTERN)
    strategy: str = Field("none", pattern=NAME_PATTERN)
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
        for name, n in (("num_nodes", t.num_nodes), ("num_devices", t.num_devices)):
            if r.num_experts % n:
                raise ValueError(
                    f"router.num_experts={r.num_experts} must be divisible by topology.{name}={n} "
                    f"(allowed: multiples of {n})"
                )
        groups = self.num_groups
        try:
            check_router(r.num_experts, r.top_k, groups, r.group_limit if groups > 1 else 1,
                         r.group_score)
        except ValueError as err:  # in the run config's terms: router.<field>, G's origin
            message = re.sub(r"\b(num_experts|top_k|group_limit|group_score)\b(?==)",
                             r"router.\1", str(err))
            message = message.replace(f"num_groups={groups}",
                                      f"the {groups} {r.limit}s of the topology")
            raise ValueError(message.replace("per group", f"per {r.limit}")) from None
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
