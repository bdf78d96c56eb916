"""The DeepSeekMoE decoder (`MoETransformer`, built from its `TransformerConfig`) and its MoE
layer (`MoELayer`, built from its `MoEConfig`)."""

from moebench.model.moe import (
    AUX_NAMES,
    ExpertParallel,
    LayerRouting,
    MoEConfig,
    MoELayer,
    RoutedExperts,
    SwiGLU,
)
from moebench.model.transformer import ModelOutput, MoETransformer, TransformerConfig

__all__ = [
    "AUX_NAMES",
    "ExpertParallel",
    "LayerRouting",
    "MoEConfig",
    "MoELayer",
    "MoETransformer",
    "ModelOutput",
    "RoutedExperts",
    "SwiGLU",
    "TransformerConfig",
]
