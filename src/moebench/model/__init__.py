"""The DeepSeekMoE decoder (`MoETransformer`) and its MoE layer (`MoELayer`)."""

from moebench.model.moe import (
    AUX_NAMES,
    ExpertParallel,
    LayerComm,
    LayerRouting,
    MoELayer,
    NonFiniteRouterError,
    RoutedExperts,
    SwiGLU,
    router_config,
    run_layout,
)
from moebench.model.transformer import ModelOutput, MoETransformer

__all__ = [
    "AUX_NAMES",
    "ExpertParallel",
    "LayerComm",
    "LayerRouting",
    "MoELayer",
    "MoETransformer",
    "ModelOutput",
    "NonFiniteRouterError",
    "RoutedExperts",
    "SwiGLU",
    "router_config",
    "run_layout",
]
