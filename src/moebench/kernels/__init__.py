"""GPU speed paths: the fused Triton router (`route_fused`, dispatched to by
`moebench.routing.route` on CUDA when `supports` holds) and the grouped expert FFN
(`grouped_experts`, `grouped_experts_gate_up`: permute by expert, `torch._grouped_mm`,
unpermute with the gates; Triton row movement and SwiGLU on CUDA).

On a machine without CUDA, importing this package sets `TRITON_INTERPRET=1` (unless set) before
the kernels are defined, so they run on CPU tensors in Triton's interpreter (tests,
`moebench kernels` on CPU); Triton reads the variable when a kernel is decorated.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moebench.kernels.experts import (
    expert_loop,
    grouped_experts,
    grouped_experts_gate_up,
    grouped_mm,
    plan_dispatch,
)
from moebench.kernels.router import FusedRouting, Launch, route_fused, supports

__all__ = [
    "FusedRouting",
    "Launch",
    "expert_loop",
    "grouped_experts",
    "grouped_experts_gate_up",
    "grouped_mm",
    "plan_dispatch",
    "route_fused",
    "supports",
]
