"""GPU speed paths: the fused Triton router (`route_fused`, dispatched to by
the MoE layer on CUDA when `supports` holds) and the grouped expert FFN
(`grouped_experts`: permute by expert, `expert_ffn` = `torch._grouped_mm` with gate and up
in one GEMM, unpermute with the gates; Triton row movement and SwiGLU on CUDA).

On a machine without CUDA, importing this package sets `TRITON_INTERPRET=1` (unless set) before
the kernels are defined, so they run on CPU tensors in Triton's interpreter (tests,
`moebench kernels` on CPU); Triton reads the variable when a kernel is decorated.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moebench.kernels.experts import (
    ExpertPlan,
    combine_rows,
    dispatch_rows,
    expert_ffn,
    expert_loop,
    grouped_experts,
    grouped_mm,
    permute_rows,
    plan_dispatch,
)
from moebench.kernels.router import FusedRouting, Launch, route_fused, supports

__all__ = [
    "ExpertPlan",
    "FusedRouting",
    "Launch",
    "combine_rows",
    "dispatch_rows",
    "expert_ffn",
    "expert_loop",
    "grouped_experts",
    "grouped_mm",
    "permute_rows",
    "plan_dispatch",
    "route_fused",
    "supports",
]
