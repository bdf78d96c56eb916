"""The DeepSeekMoE decoder (`MoETransformer`) and its MoE layer (`MoELayer`)."""

from moebench.model.moe import (
    AUX_NAMES,
    LayerRouting,
    MoELayer,
    NonFiniteRouterLogits,
    RoutedExperts,
    SwiGLU,
    router_config,
    run_layout,
)
from moebench.model.transformer import ModelOutput, MoETransformer

__all__ = [
    "AUX_NAMES",
    "LayerRouting",
    "ModelOutput",
    "MoELayer",
    "MoETransformer",
    "NonFiniteRouterLogits",
    "RoutedExperts",
    "SwiGLU",
    "router_config",
    "run_layout",
]
