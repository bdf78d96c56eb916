"""Routing: affinity scores, (group-limited) top-K selection, gates, presets, expert layout.

Public API (README "Public API"): `RouterConfig`, `preset`, `PRESETS`, `scores`, `route`,
`Routing`, `Layout`; lower-level steps `selection_key`, `group_mask`, `select_experts`,
`gate_weights` are exported for kernels and tests that check one step at a time.
"""

from moebench.routing.config import (
    BIAS_MODES,
    GROUP_SCORES,
    PRESETS,
    SCORE_FNS,
    RouterConfig,
    preset,
)
from moebench.routing.layout import Layout
from moebench.routing.router import (
    Routing,
    gate_weights,
    group_mask,
    route,
    scores,
    select_experts,
    selection_key,
)

__all__ = [
    "BIAS_MODES",
    "GROUP_SCORES",
    "PRESETS",
    "SCORE_FNS",
    "Layout",
    "RouterConfig",
    "Routing",
    "gate_weights",
    "group_mask",
    "preset",
    "route",
    "scores",
    "select_experts",
    "selection_key",
]
