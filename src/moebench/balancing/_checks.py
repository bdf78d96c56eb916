"""Argument checks shared by the balancing modules: every failure is a ValueError that names the
argument, the value it got and what is allowed.

Legend: T tokens, E routed experts, K experts per token, D devices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_int(value: Any, name: str, minimum: int) -> int:
    """An int (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an int >= {minimum}")
    return value


def check_number(value: Any, name: str, *, positive: bool) -> float:
    """A finite real number, > 0 if `positive` else >= 0 (NaN and inf are refused)."""
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if not bad:
        value = float(value)
        bad = not math.isfinite(value) or (value <= 0.0 if positive else value < 0.0)
    if bad:
        allowed = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")
    return value


def check_experts(
    experts_TK: Tensor, num_experts: int | None = None, name: str = "experts_TK"
) -> None:
    """A 2-D integer tensor of expert ids in [0, num_experts) (only >= 0 if num_experts is None)."""
    if not isinstance(experts_TK, Tensor) or experts_TK.dim() != 2:
        shape = tuple(experts_TK.shape) if isinstance(experts_TK, Tensor) else type(experts_TK)
        raise ValueError(f"{name}={shape} is invalid; allowed: a 2-D integer tensor [T, K]")
    if experts_TK.dtype not in _INT_DTYPES:
        raise ValueError(f"{name}.dtype={experts_TK.dtype} is invalid; allowed: an integer dtype")
    if experts_TK.numel() == 0:
        return
    if experts_TK.is_cuda:  # a device-side assert: the same check without a host sync
        ok = experts_TK.min() >= 0
        if num_experts is not None:
            ok = ok & (experts_TK.max() < num_experts)
        torch._assert_async(ok, f"{name} holds expert ids outside [0, {num_experts})")
        return
    lo, hi = int(experts_TK.min()), int(experts_TK.max())
    if lo < 0 or (num_experts is not None and hi >= num_experts):
        allowed = "ids >= 0" if num_experts is None else f"ids in [0, {num_experts})"
        raise ValueError(f"{name} holds expert ids in [{lo}, {hi}]; allowed: {allowed}")


def check_routing(scores_TE: Tensor, experts_TK: Tensor) -> tuple[int, int, int]:
    """Scores [T, E] (floating) and expert ids [T, K] for the same T >= 1; returns (T, E, K)."""
    if (
        not isinstance(scores_TE, Tensor)
        or scores_TE.dim() != 2
        or not scores_TE.is_floating_point()
    ):
        desc = (
            f"shape {tuple(scores_TE.shape)}, dtype {scores_TE.dtype}"
            if isinstance(scores_TE, Tensor)
            else type(scores_TE).__name__
        )
        raise ValueError(f"scores_TE ({desc}) is invalid; allowed: a 2-D floating tensor [T, E]")
    T, E = scores_TE.shape
    check_experts(experts_TK, E)
    if experts_TK.shape[0] != T or T == 0:
        raise ValueError(
            f"experts_TK has {experts_TK.shape[0]} rows; allowed: T = scores_TE rows = {T} >= 1"
        )
    K = experts_TK.shape[1]
    if not 1 <= K <= E:
        raise ValueError(f"experts_TK has K={K} columns; allowed: 1 <= K <= E = {E}")
    return T, E, K


def num_sequences(num_tokens: int, seq_len: int | None) -> int:
    """How many sequences of `seq_len` tokens the T tokens hold (None: one sequence of all T)."""
    if seq_len is None:
        return 1
    check_int(seq_len, "seq_len", 1)
    if num_tokens % seq_len:
        raise ValueError(
            f"seq_len={seq_len} does not divide the {num_tokens} tokens; "
            "allowed: a divisor of T or None"
        )
    return num_tokens // seq_len


def device_map(
    device_of_expert_E: Any, num_experts: int, device: torch.device
) -> tuple[Tensor, int]:
    """Validate an expert -> device map [E] (every device 0..D-1 non-empty); returns (map, D)."""
    dev_E = torch.as_tensor(device_of_expert_E, device=device)
    if dev_E.shape != (num_experts,) or dev_E.dtype not in _INT_DTYPES:
        raise ValueError(
            f"device_of_expert_E has shape {tuple(dev_E.shape)}, dtype {dev_E.dtype}; "
            f"allowed: integer ids of shape ({num_experts},)"
        )
    dev_E = dev_E.long()
    if int(dev_E.min()) < 0:
        raise ValueError(f"device_of_expert_E={dev_E.tolist()}; allowed: device ids >= 0")
    experts_per_device = torch.bincount(dev_E)
    if bool((experts_per_device == 0).any()):
        raise ValueError(
            f"device_of_expert_E={dev_E.tolist()} leaves a device without experts; "
            "allowed: every device id 0..D-1 used"
        )
    return dev_E, experts_per_device.numel()
