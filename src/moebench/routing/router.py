"""Top-K routing with optional group limit and aux-loss-free bias (docs/routing.md §7, vectorized).

    s      = softmax(z) | sigmoid(z)                      float32 ([V2] eq. 22, [V3] eq. 15)
    key    = s + b  ("add", [V3] eq. 16)  |  s * b  ("mul", [LF] §4.3)
    if group-limited: rank groups by max / top-2 sum / top-(K//M) sum of key, keep M,
                      key of experts in dropped groups = -inf   ([V2] §2.2.2, [V3] §2.1.2)
    sel    = top-K of key
    w      = s[sel] (never key); w /= sum(w) if normalize ([V3] eq. 13); w *= route_scale

Conventions (ours; no source specifies them):
- Ties: the lower index wins, both for groups and for experts. Selection sorts with
  `torch.sort(stable=True, descending=True)`, which keeps equal values in index order,
  so the result is deterministic on every backend (`torch.topk` promises no tie order).
  Returned experts are ordered by descending key, ties by ascending index.
- Normalization adds no epsilon: w / sum(w) exactly. The denominator is clamped to the
  smallest normal float32 only so that the degenerate case sum(w) = 0 (every selected
  sigmoid underflowed, logits below about -103) gives zero gates instead of NaN; any
  positive sum is unaffected. (HF and Megatron add 1e-20 instead.)
- Dropped groups are masked with -inf, never 0.0 ([V3-code] commit 1398800; docs/routing.md §6.3).

Legend: T tokens, E routed experts, K experts per token, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.routing.config import SCORE_FNS, RouterConfig


@dataclass(frozen=True)
class Routing:
    """Result of `route`: aligned `experts` int64 [T, K] and gate `weights` float32 [T, K]
    (differentiable w.r.t. the logits), plus the unbiased affinities `scores` float32 [T, E]
    (differentiable; the aux losses use them)."""

    experts: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def scores(logits_TE: torch.Tensor, score_fn: str) -> torch.Tensor:
    """Affinities s [T, E] in float32 whatever the logits dtype (docs/routing.md §2, [Switch] §2.4).

    "softmax" normalizes over all E routed experts ([V2] eq. 22); "sigmoid" is per expert
    ([V3] eq. 15), so its scores do not sum to 1.
    """
    logits_TE = logits_TE.to(torch.float32)
    if score_fn == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(logits_TE)
    raise ValueError(
        f"score_fn={score_fn!r} is invalid; allowed: {', '.join(repr(v) for v in SCORE_FNS)}"
    )


def _stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values along the last dim; ties go to the lower index."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def selection_key(
    scores_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: RouterConfig,
    check_values: bool = True,
) -> torch.Tensor:
    """float32 [T, E]: what ranks groups and experts: s + b ("add") or s * b ("mul").

    `bias_E` is checked here (shape [E]; finite unless `check_values` is False, which saves
    a host sync) and used in float32 ([V3-code] 4592be4).
    """
    if bias_E is None:
        return scores_TE
    if bias_E.shape != (cfg.num_experts,):
        raise ValueError(
            f"bias_E shape={tuple(bias_E.shape)} is invalid; allowed: ({cfg.num_experts},)"
        )
    bias_E = bias_E.to(device=scores_TE.device, dtype=torch.float32)
    if check_values and not bool(torch.isfinite(bias_E).all()):
        raise ValueError("bias_E contains NaN or inf; allowed: finite values only")
    return scores_TE + bias_E if cfg.bias_mode == "add" else scores_TE * bias_E


def group_mask(key_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """bool [T, G]: the M groups each token may use, ranked by `cfg.group_score` of the key.

    "max" is the V2 device score ([V2] §2.2.2, [HF-V2]); "top2_sum" the V3 node score
    ([V3] §2.1.2, the code's hard-coded 2 [V3-code]); "topk_sum" sums the top K // M.
    All groups are kept when the config is not group-limited.
    """
    T = key_TE.shape[0]
    G = cfg.num_groups
    if not cfg.group_limited:
        return torch.ones(T, G, dtype=torch.bool, device=key_TE.device)
    key_TGe = key_TE.reshape(T, G, cfg.experts_per_group)
    if cfg.group_score == "max":
        score_TG = key_TGe.amax(dim=-1)
    else:
        score_TG = key_TGe.topk(cfg.group_topk, dim=-1).values.sum(dim=-1)
    kept_TM = _stable_topk_indices(score_TG, cfg.group_limit)
    mask_TG = torch.zeros(T, G, dtype=torch.bool, device=key_TE.device)
    return mask_TG.scatter_(1, kept_TM, True)


def select_experts(key_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """int64 [T, K]: top-K of the key over the experts of the kept groups (dropped = -inf)."""
    if cfg.group_limited:
        keep_TG = group_mask(key_TE, cfg)
        keep_TE = keep_TG.repeat_interleave(cfg.experts_per_group, dim=1)
        key_TE = key_TE.masked_fill(~keep_TE, float("-inf"))
    return _stable_topk_indices(key_TE, cfg.top_k)


def gate_weights(
    scores_TE: torch.Tensor, experts_TK: torch.Tensor, cfg: RouterConfig
) -> torch.Tensor:
    """float32 [T, K]: gates from the unbiased scores of the selected experts only.

    g = s[sel] ([V2] eq. 21, [V3] eq. 14); normalized over the K selected if
    `cfg.normalize` ([V3] eq. 13, never over all E); times `route_scale` ([V3-code]).
    """
    weights_TK = scores_TE.gather(1, experts_TK)
    if cfg.normalize:
        total_T1 = weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK / total_T1.clamp_min(torch.finfo(torch.float32).tiny)
    return weights_TK * cfg.route_scale


def route(
    logits_TE: torch.Tensor, cfg: RouterConfig, bias_E: torch.Tensor | None = None,
    check_values: bool = True,
) -> Routing:
    """Route T tokens over E routed experts (docs/routing.md §7).

    `logits_TE` is the router output u_t^T e_i ([T, E], any float dtype, finite);
    `bias_E` is the aux-loss-free bias ([V3] eq. 16): it selects experts and ranks groups
    but never enters a gate. Raises ValueError for a wrong shape or NaN/inf logits or bias;
    `check_values=False` skips the two value checks (each a host sync on a GPU), for
    callers that check finiteness themselves (the MoE layer, once per step).
    """
    if logits_TE.dim() != 2 or logits_TE.shape[1] != cfg.num_experts:
        raise ValueError(
            f"logits_TE shape={tuple(logits_TE.shape)} is invalid; allowed: (T, {cfg.num_experts})"
        )
    if not logits_TE.dtype.is_floating_point:
        raise ValueError(f"logits_TE dtype={logits_TE.dtype} is invalid; allowed: a floating dtype")
    if check_values and not bool(torch.isfinite(logits_TE).all()):
        raise ValueError("logits_TE contains NaN or inf; allowed: finite values only")
    scores_TE = scores(logits_TE, cfg.score_fn)
    with torch.no_grad():
        experts_TK = select_experts(selection_key(scores_TE, bias_E, cfg, check_values), cfg)
    return Routing(experts_TK, gate_weights(scores_TE, experts_TK, cfg), scores_TE)
