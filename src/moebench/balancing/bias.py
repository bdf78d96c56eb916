"""Aux-loss-free balancing: the per-expert selection bias and its update ([V3] §2.1.2, [LF] Alg. 1
and App. C), plus a controller that does the bookkeeping a training loop needs.

The bias only changes which experts are SELECTED (docs/routing.md §4); it never enters a gate value
and is never trained by gradient. After each optimizer step it moves toward balance using the
loads of that step's whole (global) batch.

Legend: L MoE layers, E routed experts, T tokens, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from moebench.balancing._checks import check_int, check_number
from moebench.metrics import expert_load

Rule = Literal["sign", "proportional", "multiplicative"]
RULES: tuple[str, ...] = ("sign", "proportional", "multiplicative")


def _check_rule(rule: Any) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is invalid; allowed: {RULES}")


def initial_bias(rule: Rule) -> float:
    """Starting value of every bias: 0 for the additive rules, 1 for the multiplicative bias
    ([LF] App. C: selection by s * b with b initialised to 1)."""
    _check_rule(rule)
    return 1.0 if rule == "multiplicative" else 0.0


@torch.no_grad()
def update_bias(bias_E: Tensor, load_E: Tensor, rate: float, rule: Rule = "sign") -> Tensor:
    """One bias update from the loads of one step; returns the new float32 bias (input untouched).

    Works on the last dimension, so [E] and [L, E] (one row per layer) both work. With
    c_bar = mean_i load_i and e_i = c_bar - load_i:
      - "sign" ([V3] §2.1.2, [LF] Alg. 1): b_i + rate * sign(e_i). Overloaded experts lose
        `rate`, underloaded gain it, exactly average ones (sign 0) stay (as torch.sign in [MCore]).
      - "proportional" ([LF] App. C): b_i + rate * e_i / c_bar. The unit of e_i is not stated in
        [LF] (UNVERIFIED); we normalise by the mean load so that rates of 1e-2..1e-4 are
        meaningful whatever the batch size. A row with zero total load is left unchanged.
      - "multiplicative" ([LF] App. C): the same sign step, applied to a bias that multiplies
        the scores (selection by s * b, b initialised to 1; see `initial_bias`). The exact
        update of the paper is not given (UNVERIFIED); the sign step is our reading of "same
        style of update".
    `rate` must be finite and >= 0 (a negative rate would push load toward imbalance)."""
    rate = check_number(rate, "rate", positive=False)
    _check_rule(rule)
    if not isinstance(bias_E, Tensor) or not isinstance(load_E, Tensor):
        raise ValueError(
            f"bias_E/load_E of types {type(bias_E).__name__}/{type(load_E).__name__}; "
            "allowed: tensors"
        )
    if bias_E.dim() == 0 or bias_E.shape != load_E.shape:
        raise ValueError(
            f"bias_E has shape {tuple(bias_E.shape)} and load_E {tuple(load_E.shape)}; "
            "allowed: equal shapes [..., E] with E >= 1"
        )
    load = load_E.detach().to(device=bias_E.device, dtype=torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError(f"load_E={load_E.tolist()} is invalid; allowed: finite counts >= 0")
    mean = load.mean(dim=-1, keepdim=True)
    error = mean - load
    proportional = rule == "proportional"
    step = torch.where(mean > 0, error / mean, 0.0) if proportional else torch.sign(error)
    return bias_E.detach().to(torch.float32) + rate * step.to(torch.float32)


def all_reduce_sum(group: dist.ProcessGroup | None = None) -> Callable[[Tensor], Tensor]:
    """A `reduce` callable for `BiasController.step`: sums the count tensor over the ranks of
    `group` (torch.distributed all-reduce), so every rank updates with the global-batch loads,
    as [MCore] does over its tensor x context x data-parallel group."""

    def reduce(counts: Tensor) -> Tensor:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        return counts

    return reduce


class BiasController:
    """Per-layer aux-loss-free biases and the bookkeeping around them.

    - `observe(layer, experts_TK, keep_TK, training=...)` adds one micro-batch's loads of one
      layer; `training=False` (evaluation) counts nothing, so eval never moves the bias.
    - `step(step, reduce=None)` is called exactly once per optimizer step, after all
      micro-batches of gradient accumulation: it (optionally) reduces the counts over ranks,
      updates every layer's bias once, and clears the counts. A second call for the same (or an
      earlier) step is refused, so accumulation cannot cause extra updates.
    - schedule: `rate` for steps < `freeze_after_step`, then 0 (V3: 1e-3, then 0 for the last
      500B tokens, [V3] §4.2); a frozen step leaves the bias bitwise unchanged.
    - `recenter` (torchtitan): after each update subtract the per-layer mean (additive rules)
      or divide by it (multiplicative; our analogue). Neither changes any selection.
    Loads are counts of the routing actually performed, dropped assignments excluded when
    `keep_TK` is given (docs/balancing.md §6.1: the load the bias must correct).
    `bias_LE` is float32 and updated in place, so a reference to it stays current."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        rate: float,
        rule: Rule = "sign",
        freeze_after_step: int | None = None,
        recenter: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = check_int(num_layers, "num_layers", 1)
        self.num_experts = check_int(num_experts, "num_experts", 1)
        self.rate = check_number(rate, "rate", positive=False)
        _check_rule(rule)
        self.rule: Rule = rule
        if freeze_after_step is not None:
            check_int(freeze_after_step, "freeze_after_step", 0)
        self.freeze_after_step = freeze_after_step
        self.recenter = bool(recenter)
        shape = (num_layers, num_experts)
        self.bias_LE = torch.full(shape, initial_bias(rule), dtype=torch.float32, device=device)
        self.counts_LE = torch.zeros(shape, dtype=torch.int64, device=device)
        self.last_step: int | None = None

    def rate_at(self, step: int) -> float:
        """The update rate in force at optimizer step `step`: `rate`, or 0 once frozen."""
        frozen = self.freeze_after_step is not None and step >= self.freeze_after_step
        return 0.0 if frozen else self.rate

    @torch.no_grad()
    def observe(
        self,
        layer: int,
        experts_TK: Tensor,
        keep_TK: Tensor | None = None,
        *,
        training: bool,
    ) -> None:
        """Add the loads of one micro-batch of layer `layer`; a no-op when `training` is False.
        `training` is required (pass `model.training`) so that evaluation cannot count by
        omission."""
        if not isinstance(training, bool):
            raise ValueError(f"training={training!r} is invalid; allowed: True or False")
        if not training:
            return
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < self.num_layers
        ):
            raise ValueError(f"layer={layer!r} is invalid; allowed: 0 <= layer < {self.num_layers}")
        # expert_load checks the ids and keep_TK (a device-side assert on CUDA: no host sync)
        load_E = expert_load(experts_TK, self.num_experts, keep_TK)
        self.counts_LE[layer] += load_E.to(self.counts_LE.device)

    @torch.no_grad()
    def step(self, step: int, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """The single bias update of optimizer step `step` (steps must strictly increase).

        `reduce` (e.g. `all_reduce_sum()`) receives a copy of the [L, E] int64 counts and returns
        the global-batch counts; every rank must call `step` so that collectives match."""
        check_int(step, "step", 0)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"step={step} is invalid; allowed: > {self.last_step} (one update per "
                "optimizer step)"
            )
        counts = self.counts_LE.clone()
        if reduce is not None:
            counts = reduce(counts)
            if not isinstance(counts, Tensor) or counts.shape != self.counts_LE.shape:
                raise ValueError(
                    f"reduce returned {type(counts).__name__}; allowed: a tensor of shape "
                    f"{tuple(self.counts_LE.shape)}"
                )
        rate = self.rate_at(step)
        if rate > 0.0:
            new = update_bias(self.bias_LE, counts, rate, self.rule)
            if self.recenter:
                mean = new.mean(dim=-1, keepdim=True)
                new = new / mean if self.rule == "multiplicative" else new - mean
            self.bias_LE.copy_(new)
        self.counts_LE.zero_()
        self.last_step = step

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: biases, pending counts, last step, and the rule."""
        return {
            "bias_LE": self.bias_LE.detach().clone(),
            "counts_LE": self.counts_LE.clone(),
            "last_step": self.last_step,
            "rule": self.rule,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (shapes and rule must match this controller)."""
        shape = (self.num_layers, self.num_experts)
        if state.get("rule") != self.rule:
            raise ValueError(f"state rule={state.get('rule')!r}; allowed: {self.rule!r}")
        for key in ("bias_LE", "counts_LE"):
            value = state.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                raise ValueError(f"state[{key!r}] is invalid; allowed: a tensor of shape {shape}")
        last = state.get("last_step")
        if last is not None:
            check_int(last, "last_step", 0)
        self.bias_LE.copy_(state["bias_LE"])
        self.counts_LE.copy_(state["counts_LE"])
        self.last_step = last
