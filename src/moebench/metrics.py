"""Load-balance metrics: per-expert load, MaxVio, groups touched per token, dropped fraction.

MaxVio ([LF] eq. 4) = (max_i Load_i - Load_bar) / Load_bar, with Load_bar the load of a
perfectly balanced router, i.e. the mean load over experts. Per-batch and global MaxVio
differ only in which tokens are counted (docs/metrics.md §1): compute it on the loads of
the batch, or on loads summed over the whole evaluation set, never by averaging ratios
of one into the other. The model-level number averages over MoE layers ([LF] §4.1).

Legend: T tokens, K experts per token, E routed experts, L MoE layers.
"""

from __future__ import annotations

import torch


def _check_keep(keep_TK: torch.Tensor, shape: torch.Size) -> None:
    if keep_TK.dtype != torch.bool or keep_TK.shape != shape:
        raise ValueError(
            f"keep_TK dtype={keep_TK.dtype} shape={tuple(keep_TK.shape)} is invalid; "
            f"allowed: torch.bool of shape {tuple(shape)}"
        )


def expert_load(
    experts_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [E]: tokens assigned to each expert; assignments with keep_TK False (dropped)
    are not counted."""
    if experts_TK.dim() != 2 or experts_TK.dtype.is_floating_point:
        raise ValueError(
            f"experts_TK dtype={experts_TK.dtype} shape={tuple(experts_TK.shape)} is invalid; "
            "allowed: an integer tensor [T, K]"
        )
    outside = (experts_TK < 0) | (experts_TK >= num_experts)
    if experts_TK.is_cuda:  # a device-side assert: the same check without a host sync
        torch._assert_async(~outside.any(), f"experts_TK holds ids outside 0..{num_experts - 1}")
    elif bool(outside.any()):
        raise ValueError(
            f"experts_TK holds ids in [{int(experts_TK.min())}, {int(experts_TK.max())}]; "
            f"allowed: 0..{num_experts - 1} (num_experts={num_experts})"
        )
    ids = experts_TK.reshape(-1).long()
    ones = torch.ones_like(ids)
    if keep_TK is not None:
        _check_keep(keep_TK, experts_TK.shape)
        ones = keep_TK.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, ones)


def max_vio(load_E: torch.Tensor) -> float:
    """MaxVio = (max - mean) / mean of the loads ([LF] eq. 4); 0 iff perfectly balanced."""
    if load_E.dim() != 1 or load_E.numel() == 0:
        raise ValueError(f"load_E shape={tuple(load_E.shape)} is invalid; allowed: [E], E >= 1")
    load_E = load_E.to(torch.float64)
    mean = load_E.mean()
    if not mean > 0:
        raise ValueError(f"load_E has mean {float(mean)}; allowed: a positive mean load")
    return float((load_E.max() - mean) / mean)


def max_vio_layers(load_LE: torch.Tensor) -> float:
    """Mean over layers of each layer's MaxVio ([LF] §4.1 averages over MoE layers)."""
    if load_LE.dim() != 2 or load_LE.shape[0] == 0:
        raise ValueError(
            f"load_LE shape={tuple(load_LE.shape)} is invalid; allowed: [L, E], L >= 1"
        )
    return sum(max_vio(load_E) for load_E in load_LE) / load_LE.shape[0]


def groups_per_token(experts_TK: torch.Tensor, group_of_expert_E: torch.Tensor) -> torch.Tensor:
    """int64 [T]: distinct groups (devices or nodes, e.g. `Layout.node_of_expert`) that
    each token's experts span."""
    groups_TK = torch.sort(group_of_expert_E.to(experts_TK.device)[experts_TK], dim=-1).values
    changes_T = (groups_TK[:, 1:] != groups_TK[:, :-1]).sum(dim=-1)
    return (changes_T + (groups_TK.shape[1] > 0)).long()


def dropped_frac(keep_TK: torch.Tensor) -> float:
    """Fraction of (token, expert) assignments dropped (keep_TK False)."""
    if keep_TK.dtype != torch.bool or keep_TK.numel() == 0:
        raise ValueError(
            f"keep_TK dtype={keep_TK.dtype} shape={tuple(keep_TK.shape)} is invalid; "
            "allowed: a non-empty torch.bool tensor"
        )
    return float((~keep_TK).sum()) / keep_TK.numel()
