"""Router configuration (`RouterConfig`) and the published presets (`preset`).

Every option maps to one line of the reference algorithm in `docs/routing.md` §7; the
presets are the published configurations of `docs/published.md` §6.

Legend: E routed experts, K experts per token (top-k), G groups (devices for V2
device-limited routing, nodes for V3 node-limited routing), M = `group_limit`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from moebench.config import check_router, default_normalize

SCORE_FNS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum", "topk_sum")
BIAS_MODES = ("add", "mul")


def _allowed(values: tuple[str, ...]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {low}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {_allowed(allowed)}")


@dataclass(frozen=True)
class RouterConfig:
    """What the router computes for one MoE layer (docs/routing.md §7).

    - `score_fn`: affinity s = softmax over all E logits ([V2] eq. 22) or per-expert
      sigmoid ([V3] eq. 15).
    - `num_groups`, `group_limit`: group-limited routing; expert i is in group
      i // (E / G) (contiguous blocks, as the official code's view [V3-code]); at most M
      groups are used per token ([V2] §2.2.2 devices, [V3] §2.1.2 nodes). An unset
      `group_limit` means M = G, no limit (as Megatron-Core reads an unset
      `moe_router_group_topk`); `num_groups=1` means no limit, `group_limit` is then ignored.
    - `group_score`: how a group is ranked: "max" (V2, [HF-V2]), "top2_sum" (the V3 code's
      hard-coded sum of the top-2 scores [V3-code]) or "topk_sum" (sum of the top K // M,
      the paper's K_r/M reading; Megatron's rule; our convention for non-integer K/M).
    - `normalize`: divide the selected gates by their sum ([V3] eq. 13); unset, it is on for
      sigmoid with K > 1 and off for softmax (`default_normalize`); `route_scale`
      multiplies the gates afterwards ([V3-code] `route_scale`, [HF-V2]
      `routed_scaling_factor`).
    - `bias_mode`: how the aux-loss-free bias enters selection: "add" ranks by s + b
      ([V3] eq. 16, [LF] eq. 3); "mul" ranks by s * b (Wang et al.'s multiplicative
      variant, [LF] §4.3, b initialised to 1). The bias never enters a gate.
    """

    num_experts: int
    top_k: int
    score_fn: str = "softmax"
    num_groups: int = 1
    group_limit: int | None = None
    group_score: str = "max"
    normalize: bool | None = None
    route_scale: float = 1.0
    bias_mode: str = "add"

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        _check_choice("score_fn", self.score_fn, SCORE_FNS)
        _check_choice("group_score", self.group_score, GROUP_SCORES)
        _check_choice("bias_mode", self.bias_mode, BIAS_MODES)
        if self.normalize is None:  # frozen: resolve the per-score-function default once
            object.__setattr__(self, "normalize", default_normalize(self.score_fn, self.top_k))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r} is invalid; allowed: True, False")
        scale = self.route_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"route_scale={scale!r} is invalid; allowed: a finite number > 0")
        _check_int("num_groups", self.num_groups, 1)
        if self.group_limit is None:
            object.__setattr__(self, "group_limit", self.num_groups)
        _check_int("group_limit", self.group_limit, 1)
        check_router(
            self.num_experts, self.top_k, self.num_groups, self.group_limit, self.group_score
        )

    @property
    def experts_per_group(self) -> int:
        """E / G: experts in each contiguous group."""
        return self.num_experts // self.num_groups

    @property
    def group_limited(self) -> bool:
        """True when the M-group limit can change a selection (1 < G and M < G)."""
        return self.num_groups > 1 and self.group_limit < self.num_groups

    @property
    def group_topk(self) -> int:
        """How many of a group's scores its group score uses (1, 2 or K // M)."""
        return {"max": 1, "top2_sum": 2, "topk_sum": self.top_k // self.group_limit}[
            self.group_score
        ]

    def group_of_expert(self) -> torch.Tensor:
        """int64 [E]: the group of every expert, i // (E / G) (contiguous blocks)."""
        return torch.arange(self.num_experts) // self.experts_per_group


_PRESETS: dict[str, dict[str, Any]] = {
    # [Switch] §2.1: top-1 of a softmax, gate = the probability. E is not fixed by the
    # paper (it sweeps it); 64 matches the DeepSeek/Wang settings (our convention).
    "switch": dict(num_experts=64, top_k=1, score_fn="softmax"),
    # [GShard] Alg. 1: top-2 of a softmax, gates g1/(g1+g2), g2/(g1+g2). The random
    # dispatch of the second expert is a capacity matter, not done here. E = 64 as above.
    "gshard": dict(num_experts=64, top_k=2, score_fn="softmax", normalize=True),
    # [V2] §2.2.2, §3.1.2; [V3-cfg] config_236B.json; [HF-cfg] n_group 8, topk_group 3.
    "v2": dict(
        num_experts=160,
        top_k=6,
        score_fn="softmax",
        num_groups=8,
        group_limit=3,
        group_score="max",
        normalize=False,
        route_scale=16.0,
    ),
    # [V2] App. B.1; [V3-cfg] config_16B.json: plain top-6 of 64, no device limit.
    "v2-lite": dict(num_experts=64, top_k=6, score_fn="softmax", route_scale=1.0),
    # [V3] §2.1.2, §4.2, eq. 13-16; [V3-cfg] config_671B.json (route_scale 2.5).
    "v3": dict(
        num_experts=256,
        top_k=8,
        score_fn="sigmoid",
        num_groups=8,
        group_limit=4,
        group_score="top2_sum",
        normalize=True,
        route_scale=2.5,
    ),
    # [LF] §4.1, Table 5: sigmoid, 64 routed experts, top-6, no group limit.
    # normalize=False and route_scale=1.0 follow [LF] eq. 1/3 (g = s); whether the
    # runs normalized or scaled is UNVERIFIED.
    "wang": dict(num_experts=64, top_k=6, score_fn="sigmoid", normalize=False, route_scale=1.0),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> RouterConfig:
    """The published router of `name` (see `PRESETS`), with fields replaced by `overrides`.

    The presets are docs/published.md §6 / docs/routing.md §7: "switch" (softmax top-1),
    "gshard" (softmax top-2, normalized), "v2" (160 experts, 8 devices, M=3, max, x16),
    "v2-lite" (softmax top-6 of 64), "v3" (sigmoid top-8 of 256, 8 nodes, M=4, top-2 sum,
    normalized, x2.5), "wang" (sigmoid top-6 of 64; normalization and scale UNVERIFIED).
    Overrides are validated like any `RouterConfig`.
    """
    if name not in _PRESETS:
        raise ValueError(f"preset name={name!r} is unknown; allowed: {_allowed(PRESETS)}")
    fields = tuple(f.name for f in dataclasses.fields(RouterConfig))
    for key in overrides:
        if key not in fields:
            raise ValueError(f"preset override {key}= is unknown; allowed: {', '.join(fields)}")
    return RouterConfig(**{**_PRESETS[name], **overrides})
