"""Capacity factors and token dropping: Switch-style per-expert capacity ([Switch] §2.2 eq. 3)
and DeepSeek-V2 device-level dropping ([V2] §2.2.4). Every function returns a keep mask aligned
with the routing; the exact number of dropped assignments is `(~keep_TK).sum()`. A dropped
assignment contributes nothing (its gate is zeroed by the caller; docs/balancing.md §7.3).

Legend: T tokens, E routed experts, K experts per token, D devices, A = T*K assignments
(flattened token-major: assignment t*K + k is slot k of token t).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Literal

import torch
from torch import Tensor

from moebench.balancing._checks import check_experts, check_int, check_number, device_map

Policy = Literal["probs", "position"]
POLICIES: tuple[str, ...] = ("probs", "position")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    """Max assignments one expert may take: ceil(T * k / E * factor) ([Switch] eq. 3 with the
    top-k generalisation of [MCore]; `ceil` is our convention, the papers do not say how to
    round). `factor` is used at its decimal value (Fraction(str(factor))), so 1.1 means exactly
    11/10 and float rounding cannot push an integer capacity up by one."""
    check_int(num_tokens, "num_tokens", 0)
    check_int(num_experts, "num_experts", 1)
    check_int(top_k, "top_k", 1)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is invalid; allowed: 1 <= top_k <= {num_experts}")
    return _budget(num_tokens * top_k, num_experts, factor)


def _budget(assignments: int, buckets: int, factor: float) -> int:
    """ceil(assignments / buckets * factor), exact, with `factor` at its decimal value."""
    factor = check_number(factor, "factor", positive=True)
    return math.ceil(Fraction(assignments, buckets) * Fraction(str(factor)))


def _aligned_affinity(experts_TK: Tensor, affinity: Tensor, name: str) -> Tensor:
    """Affinity per assignment [T, K]: `affinity` itself if it is [T, K] (aligned with
    experts_TK, e.g. Routing.weights), else scores [T, E] gathered at experts_TK."""
    T, K = experts_TK.shape
    if not isinstance(affinity, Tensor) or affinity.dim() != 2 or affinity.shape[0] != T:
        shape = tuple(affinity.shape) if isinstance(affinity, Tensor) else type(affinity).__name__
        raise ValueError(f"{name} has shape {shape}; allowed: [T, K] = [{T}, {K}] or [{T}, E]")
    if affinity.shape[1] != K:
        check_experts(experts_TK, affinity.shape[1])
        affinity = affinity.gather(1, experts_TK.long())
    affinity = affinity.detach().float()
    if bool(torch.isnan(affinity).any()):
        raise ValueError(f"{name} contains NaN; allowed: real affinities")
    return affinity


def _rank_in_bucket(bucket_A: Tensor, priorities_A: list[Tensor]) -> Tensor:
    """Rank of every assignment inside its bucket (expert or device), ordering by the
    `priorities_A` keys, each descending, the most significant LAST; remaining ties go to the
    earlier assignment (stable sorts over the token-major order)."""
    order = torch.arange(bucket_A.numel(), device=bucket_A.device)
    for key_A in priorities_A:
        order = order[torch.sort(key_A[order], descending=True, stable=True).indices]
    order = order[torch.sort(bucket_A[order], stable=True).indices]
    per_bucket = torch.bincount(bucket_A)
    start_of_bucket = torch.cumsum(per_bucket, 0) - per_bucket
    rank_A = torch.empty_like(order)
    rank_A[order] = (
        torch.arange(order.numel(), device=order.device) - start_of_bucket[bucket_A[order]]
    )
    return rank_A


def drop_by_capacity(
    experts_TK: Tensor,
    affinity: Tensor | None,
    capacity: int,
    policy: Policy = "probs",
) -> Tensor:
    """Keep at most `capacity` assignments per expert; returns keep_TK (bool [T, K]).

    policy "probs": inside an over-capacity expert the lowest-affinity assignments are dropped
    first (ties: the later token goes); `affinity` is scores [T, E] or aligned weights [T, K]
    (a [T, K] tensor is always read as aligned). policy "position": the later tokens (then
    later slots) are dropped first, as in [Switch] and Megatron's "position" policy;
    `affinity` is ignored and may be None."""
    check_experts(experts_TK)
    check_int(capacity, "capacity", 0)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid; allowed: {POLICIES}")
    keys = []
    if policy == "probs":
        if affinity is None:
            raise ValueError("affinity=None is invalid for policy='probs'; allowed: a tensor")
        keys.append(_aligned_affinity(experts_TK, affinity, "affinity").reshape(-1))
    if experts_TK.numel() == 0:
        return torch.ones(experts_TK.shape, dtype=torch.bool, device=experts_TK.device)
    rank_A = _rank_in_bucket(experts_TK.reshape(-1).long(), keys)
    return (rank_A < capacity).reshape(experts_TK.shape)


def protected_sequences(
    num_tokens: int,
    seq_len: int,
    fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-token mask of the sequences exempt from device dropping: each sequence is protected
    independently with probability `fraction` (a seeded Bernoulli; V2 protects about 10% of
    training sequences, [V2] §2.2.4; the selection rule: our convention, docs/balancing.md §7.3)."""
    check_int(num_tokens, "num_tokens", 0)
    check_int(seq_len, "seq_len", 1)
    if num_tokens % seq_len:
        raise ValueError(
            f"seq_len={seq_len} is invalid; allowed: a divisor of num_tokens={num_tokens}"
        )
    fraction = check_number(fraction, "fraction", positive=False)
    if fraction > 1.0:
        raise ValueError(f"fraction={fraction} is invalid; allowed: 0 <= fraction <= 1")
    draws = torch.rand(num_tokens // seq_len, generator=generator)
    return (draws < fraction).repeat_interleave(seq_len)


def device_drop(
    experts_TK: Tensor,
    affinity_TK: Tensor,
    device_of_expert_E: Any,
    factor: float,
    protected_T: Tensor | None = None,
) -> Tensor:
    """DeepSeek-V2 device-level token dropping ([V2] §2.2.4, §3.1.2); returns keep_TK.

    Every device gets budget = ceil(K * T / D * factor) token-expert assignments (factor 1.0 =
    the average computational budget). On an over-budget device the lowest-affinity
    assignments are dropped first, one (token, expert) at a time (ties: the later token goes).
    Assignments of protected tokens (`protected_T`, bool [T], e.g. `protected_sequences`)
    count toward the budget but are never dropped, so such a device may stay over budget.
    Under-budget devices receive nothing extra (no re-routing). Units, granularity and the
    protection rule are moebench conventions (docs/balancing.md §7.3). `affinity_TK` is s_{i,t},
    aligned [T, K] or scores [T, E]. Call it in training only (V2 drops nothing at eval)."""
    check_experts(experts_TK)
    affinity_A = _aligned_affinity(experts_TK, affinity_TK, "affinity_TK").reshape(-1)
    T, K = experts_TK.shape
    dev_E = torch.as_tensor(device_of_expert_E, device=experts_TK.device)
    check_experts(experts_TK, dev_E.numel())
    dev_E, D = device_map(dev_E, dev_E.numel(), experts_TK.device)
    budget = _budget(T * K, D, factor)
    if protected_T is None:
        protected_T = torch.zeros(T, dtype=torch.bool, device=experts_TK.device)
    if (
        not isinstance(protected_T, Tensor)
        or protected_T.shape != (T,)
        or protected_T.dtype != torch.bool
    ):
        desc = tuple(protected_T.shape) if isinstance(protected_T, Tensor) else protected_T
        raise ValueError(
            f"protected_T={desc!r} is invalid; allowed: a bool tensor of shape ({T},) or None"
        )
    if T == 0:
        return torch.ones(experts_TK.shape, dtype=torch.bool, device=experts_TK.device)
    protected_A = protected_T.to(experts_TK.device).repeat_interleave(K)
    device_A = dev_E[experts_TK.reshape(-1).long()]
    rank_A = _rank_in_bucket(device_A, [affinity_A, protected_A.to(torch.uint8)])
    return (protected_A | (rank_A < budget)).reshape(experts_TK.shape)
