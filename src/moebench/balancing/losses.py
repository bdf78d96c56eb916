"""Auxiliary load-balancing losses: Switch/GShard, DeepSeek-V2 expert/device/communication level,
DeepSeek-V3 sequence-wise and global-batch; plus the ST-MoE router z-loss (`z_loss`).

Every loss is a dot product sum_i f_i * P_i (docs/balancing.md §1): f counts the hard
selection and is a constant (built from integer ids, so it carries no gradient), P is a mean
routing score and carries the whole gradient. Each function returns the UNWEIGHTED term, scaled
so that a perfectly uniform router gives exactly 1; the caller multiplies by its alpha. Scores
are computed in float32, or float64 when given float64 (exact-arithmetic tests).

Legend: T tokens, E routed experts, K experts per token, D devices, M max devices per token,
B sequences in the batch, S tokens per sequence (T = B * S).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from moebench.balancing._checks import (
    check_int,
    check_routing,
    device_map,
    num_sequences,
)

GSHARD_FORMS = ("code", "paper")


def literal_topk(scores_TE: Tensor, k: int) -> Tensor:
    """Plain top-k of the unbiased scores over all experts: [V3] eq. (18) read literally (no
    bias, no group limit), as Megatron's `compute_routing_scores_for_aux_loss` does. Ties go to
    the lower expert index (stable sort). Returns int64 [T, k].

    Pass its result as `experts_TK` for the literal f-counts, or the routing actually performed
    (`Routing.experts`) for the "actual" reading; docs/balancing.md §5 says which is which."""
    if not isinstance(scores_TE, Tensor) or scores_TE.dim() != 2:
        desc = tuple(scores_TE.shape) if isinstance(scores_TE, Tensor) else type(scores_TE).__name__
        raise ValueError(f"scores_TE={desc} is invalid; allowed: a 2-D tensor [T, E]")
    E = scores_TE.shape[1]
    check_int(k, "k", 1)
    if k > E:
        raise ValueError(f"k={k} is invalid; allowed: 1 <= k <= E = {E}")
    order_TE = torch.sort(scores_TE.detach(), dim=-1, descending=True, stable=True).indices
    return order_TE[:, :k]


def _real(scores_TE: Tensor) -> Tensor:
    """Scores in float32, or float64 if they already are (never a lower precision)."""
    return scores_TE.to(torch.promote_types(scores_TE.dtype, torch.float32))


def _seq_counts(experts_TK: Tensor, num_experts: int, num_seqs: int, dtype: torch.dtype) -> Tensor:
    """Selection counts per sequence, [B, E] of `dtype`: how many of a sequence's (token, slot)
    assignments went to each expert."""
    ids_BA = experts_TK.reshape(num_seqs, -1).long()
    ones_BA = torch.ones(ids_BA.shape, dtype=dtype, device=ids_BA.device)
    counts = torch.zeros(num_seqs, num_experts, dtype=dtype, device=ids_BA.device)
    return counts.scatter_add_(1, ids_BA, ones_BA)


def _seq_mean_scores(scores_TE: Tensor, num_seqs: int) -> Tensor:
    """P: mean score of each expert per sequence, [B, E] (differentiable)."""
    return _real(scores_TE).reshape(num_seqs, -1, scores_TE.shape[1]).mean(dim=1)


def _seq_expert_f(
    experts_TK: Tensor, num_experts: int, num_seqs: int, dtype: torch.dtype
) -> Tensor:
    """f_i = E / (K S) * count_i per sequence ([V2] eq. 24, [V3] eq. 18); 1 when balanced."""
    T, K = experts_TK.shape
    counts_BE = _seq_counts(experts_TK, num_experts, num_seqs, dtype)
    return counts_BE * (num_experts / (K * (T // num_seqs)))


def _sum_per_device(values_BE: Tensor, dev_E: Tensor, num_devices: int) -> Tensor:
    """Sum of per-expert values over the experts of each device, [B, D]."""
    out = torch.zeros(
        values_BE.shape[0], num_devices, dtype=values_BE.dtype, device=values_BE.device
    )
    return out.index_add(1, dev_E, values_BE)


def _normalised(scores_TE: Tensor) -> Tensor:
    """s'_{i,t} = s_{i,t} / sum_j s_{j,t} over ALL routed experts ([V3] eq. 19)."""
    scores = _real(scores_TE)
    return scores / scores.sum(dim=-1, keepdim=True)


def _expert_term(
    scores_TE: Tensor, experts_TK: Tensor, seq_len: int | None, *, normalise: bool
) -> Tensor:
    """Mean over sequences of sum_i f_i P_i with the expert-level f (eq. 24 / 18); P from s, or
    from s' (eq. 19) when `normalise`."""
    T, E, _ = check_routing(scores_TE, experts_TK)
    B = num_sequences(T, seq_len)
    scores = _normalised(scores_TE) if normalise else _real(scores_TE)
    f_BE = _seq_expert_f(experts_TK, E, B, scores.dtype)
    return (f_BE * _seq_mean_scores(scores, B)).sum(dim=1).mean()


def expert_loss(scores_TE: Tensor, experts_TK: Tensor, seq_len: int | None = None) -> Tensor:
    """DeepSeek-V2 expert-level balance loss without alpha_1 ([V2] eq. 23-25, [DSMoE] eq. 12-14).

    sum_i f_i P_i with f_i = E/(K S) * #(tokens selecting i), P_i = mean_t s_{i,t}, computed per
    sequence of `seq_len` tokens then averaged over sequences (the HF `seq_aux` convention);
    None treats all T tokens as one sequence. `scores_TE` are the affinities s (softmax over all
    routed experts for V2, not the renormalised gates); `experts_TK` the selection counted."""
    return _expert_term(scores_TE, experts_TK, seq_len, normalise=False)


def switch_loss(scores_TE: Tensor, experts_TK: Tensor, counts_E: Tensor | None = None) -> Tensor:
    """Switch Transformer load-balancing loss without alpha ([Switch] eq. 4-6, code form).

    E * sum_i f_i P_i over the whole batch, with f_i = count_i / (K T) (the usual top-k
    generalisation of eq. 5, which is the top-1 fraction for K = 1) and P_i = mean router
    probability. Numerically `expert_loss` with seq_len=None (docs/balancing.md §2). Equals 1
    for a uniform router; GShard's paper form is 1/E^2 times smaller (see `gshard_loss`).
    `counts_E`: selection counts of the whole batch when these tokens are only part of it
    (all-reduced over data-parallel ranks), as in `global_loss`; P stays local."""
    if counts_E is None:
        return expert_loss(scores_TE, experts_TK, seq_len=None)
    return _counts_term(scores_TE, experts_TK, counts_E, normalise=False)


def gshard_loss(
    scores_TE: Tensor,
    experts_TK: Tensor,
    group_size: int | None = None,
    form: Literal["code", "paper"] = "code",
) -> Tensor:
    """GShard auxiliary loss ([GShard] Alg. 1 line 13), computed per group of `group_size`
    tokens (None: one group) and averaged over groups (our convention).

    paper form: l_aux = (1/E) * sum_e (c_e/S) * m_e, with c_e counting only FIRST choices
    (`experts_TK[:, 0]`) and m_e the mean gate; it equals 1/E^2 at perfect balance.
    code form (Mesh-TensorFlow style, `mean_e(density * proxy) * E^2`): E^2 times the paper
    form, = 1 at perfect balance; the default, so that it sits on the Switch scale."""
    if form not in GSHARD_FORMS:
        raise ValueError(f"form={form!r} is invalid; allowed: {GSHARD_FORMS}")
    T, E, _ = check_routing(scores_TE, experts_TK)
    B = num_sequences(T, group_size)
    first_TK = experts_TK[:, :1]
    scores = _real(scores_TE)
    density_BE = _seq_counts(first_TK, E, B, scores.dtype) / (T // B)
    paper = (density_BE * _seq_mean_scores(scores, B)).sum(dim=1).mean() / E
    return paper * E**2 if form == "code" else paper


def device_loss(
    scores_TE: Tensor,
    experts_TK: Tensor,
    device_of_expert_E: Tensor,
    seq_len: int | None = None,
) -> Tensor:
    """DeepSeek-V2 device-level balance loss without alpha_2 ([V2] eq. 26-28, [DSMoE] eq. 15).

    sum_d f'_d P'_d with f'_d = MEAN of the expert f_j (eq. 24) over the experts on device d and
    P'_d = SUM of their P_j; per sequence, then mean over sequences. `device_of_expert_E[i]` is
    the device of expert i (e.g. `Layout.device_of_expert`); every device 0..D-1 must hold one."""
    T, E, _ = check_routing(scores_TE, experts_TK)
    B = num_sequences(T, seq_len)
    dev_E, D = device_map(device_of_expert_E, E, scores_TE.device)
    scores = _real(scores_TE)
    experts_per_device_D = torch.bincount(dev_E, minlength=D).to(scores.dtype)
    f_BE = _seq_expert_f(experts_TK, E, B, scores.dtype)
    f_BD = _sum_per_device(f_BE, dev_E, D) / experts_per_device_D
    P_BD = _sum_per_device(_seq_mean_scores(scores, B), dev_E, D)
    return (f_BD * P_BD).sum(dim=1).mean()


def comm_loss(
    scores_TE: Tensor,
    experts_TK: Tensor,
    device_of_expert_E: Tensor,
    group_limit: int,
    seq_len: int | None = None,
) -> Tensor:
    """DeepSeek-V2 communication balance loss without alpha_3 ([V2] eq. 29-31).

    sum_d f''_d P''_d with f''_d = D/(M S) * #(tokens sent to device d), where a token counts
    ONCE per device however many of its experts live there, and P''_d = sum of P_j over the
    device's experts; per sequence, then mean over sequences. M = `group_limit`, the max devices
    per token of device-limited routing (1 <= M <= D)."""
    T, E, _ = check_routing(scores_TE, experts_TK)
    B = num_sequences(T, seq_len)
    dev_E, D = device_map(device_of_expert_E, E, scores_TE.device)
    check_int(group_limit, "group_limit", 1)
    if group_limit > D:
        raise ValueError(f"group_limit={group_limit} is invalid; allowed: 1 <= M <= D = {D}")
    scores = _real(scores_TE)
    sent_TD = torch.zeros(T, D, dtype=scores.dtype, device=scores.device)
    sent_TD.scatter_(1, dev_E[experts_TK.long()], 1.0)
    f_BD = sent_TD.reshape(B, -1, D).sum(dim=1) * (D / (group_limit * (T // B)))
    P_BD = _sum_per_device(_seq_mean_scores(scores_TE, B), dev_E, D)
    return (f_BD * P_BD).sum(dim=1).mean()


def seq_loss(scores_TE: Tensor, experts_TK: Tensor, seq_len: int | None = None) -> Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss without alpha ([V3] eq. 17-20).

    As `expert_loss` but P_i averages s' = s / sum over all E (eq. 19), so sigmoid scores are on
    the right scale (for softmax scores s' = s). Per sequence of `seq_len` tokens, then mean
    over sequences (our convention, docs/balancing.md §5); None = the whole batch as one scope, i.e.
    the batch-wise loss of [V3] §4.5.3. For the literal reading of eq. 18 pass
    `literal_topk(scores_TE, K)` as `experts_TK`; for the "actual" reading the routing used."""
    return _expert_term(scores_TE, experts_TK, seq_len, normalise=True)


def global_loss(scores_TE: Tensor, experts_TK: Tensor, counts_E: Tensor | None = None) -> Tensor:
    """Global-batch balance loss without alpha ([V3] §4.5.3 batch-wise scope; [Qwen]).

    sum_i f_i P_i with P_i = mean over THESE tokens of s' (eq. 19) and f_i = E * c_i / sum_j c_j,
    which is E/(K T) * c_i when c counts all K*T assignments of the batch. `counts_E` lets the
    caller pass selection counts summed (all-reduced) over micro-batches and ranks, so that f
    describes the global batch while P, and the gradient, stay local (the training loop passes
    the running count of the optimizer step, docs/global_loss.md). None: counts from
    `experts_TK` (then this equals `seq_loss(scores_TE, experts_TK, None)`)."""
    if counts_E is None:
        return _expert_term(scores_TE, experts_TK, None, normalise=True)
    return _counts_term(scores_TE, experts_TK, counts_E, normalise=True)


def _counts_term(
    scores_TE: Tensor, experts_TK: Tensor, counts_E: Tensor, *, normalise: bool
) -> Tensor:
    """sum_i f_i P_i with f_i = E * c_i / sum_j c_j from the given counts and P_i the mean over
    these tokens of s, or of s' (eq. 19) when `normalise`."""
    _, E, _ = check_routing(scores_TE, experts_TK)
    scores = _normalised(scores_TE) if normalise else _real(scores_TE)
    counts = torch.as_tensor(counts_E, device=scores.device).detach().to(scores.dtype)
    if counts.shape != (E,):
        raise ValueError(f"counts_E has shape {tuple(counts.shape)}; allowed: ({E},)")
    total = counts.sum()
    valid = torch.isfinite(counts).all() & (counts >= 0).all() & (total > 0)
    allowed = "allowed: finite, >= 0, positive sum"
    if counts.is_cuda:  # a device-side assert: the same check without a host sync
        torch._assert_async(valid, f"counts_E is invalid; {allowed}")
    elif not bool(valid):
        raise ValueError(f"counts_E={counts.tolist()} is invalid; {allowed}")
    f_E = counts * (E / total)
    return (f_E * scores.mean(dim=0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss without its coefficient ([ST-MoE] Zoph et al. 2022, eq. 5):
    mean over tokens of (logsumexp_i logits_{t,i})^2, in float32 (float64 if given). It
    penalises large router logits (numerical stability), not imbalance; 0 only if every
    token's logsumexp is 0."""
    if not isinstance(logits_TE, Tensor) or logits_TE.dim() != 2 or logits_TE.shape[1] < 1:
        desc = tuple(logits_TE.shape) if isinstance(logits_TE, Tensor) else type(logits_TE).__name__
        raise ValueError(f"logits_TE={desc} is invalid; allowed: a 2-D tensor [T, E], E >= 1")
    return torch.logsumexp(_real(logits_TE), dim=-1).square().mean()
