"""Published settings and the claims they support, checked on our paired seeds.

A `Setting` is one published training run (its numbers, where it is printed, and the
`Recipe` a strategy follows to stand for it). A study says which of its strategies
reproduces which setting (`report.compare_to` in the study file); a study without that
section is matched by what each strategy's resolved config does (`match_settings`), never by
strategy name. A `Claim` compares two settings; it is checked on the two strategies
that reproduce them, with the paired difference over seeds: reproduced / not resolved /
contradicted (docs/statistics.md). The published models are 1B-3.4B parameters trained on
10^11 tokens; ours are orders of magnitude smaller, so only directions and the size of gaps
are comparable, never absolute values. The numbers and their tables: docs/published.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from moebench.report.stats import Paired, strategy_order

_LF = "1B MoE, 100B tokens"
_QIU = "3.4B MoE (0.6B active), 120B tokens"
_V3 = "1B MoE, DeepSeek corpus and tokenizer"


@dataclass(frozen=True)
class Recipe:
    """What a run does to stand for a published setting: its `family` (gate, routing limit
    and the names of its non-zero balance knobs, as `summary.load_settings` writes it), and
    where the setting fixes them, its M and its one knob's value."""

    family: str
    group_limit: int | None = None
    knob_value: float | None = None

    def followed_by(self, run: pd.Series) -> bool:
        """Whether a row of `summary.load_settings` follows this recipe."""
        return (
            run["family"] == self.family
            and self.group_limit in (None, run["group_limit"])
            and (self.knob_value is None or math.isclose(run["knob_value"], self.knob_value))
        )


@dataclass(frozen=True)
class Setting:
    """One published run: what was trained, its published metrics, where they are, and the
    recipe a strategy follows to be matched to it (None: only by `report.compare_to`)."""

    description: str
    values: dict[str, float]
    source: str
    recipe: Recipe | None = None


_SIGMOID_FREE = Recipe("sigmoid none bias.rate")
_V2_LOSSES = "comm_alpha device_alpha expert_alpha"


SETTINGS: dict[str, Setting] = {
    # Wang et al. 2408.15664 [LF], Table 2 (sigmoid gate).
    "lf_t2_aux": Setting(
        f"{_LF}, sigmoid gate, aux loss alpha=1e-3",
        {"val_ppl": 9.56, "maxvio_global": 0.72},
        "[LF] Table 2",
        Recipe("sigmoid none global_alpha"),
    ),
    "lf_t2_free": Setting(
        f"{_LF}, sigmoid gate, loss-free bias u=1e-3",
        {"val_ppl": 9.50, "maxvio_global": 0.04},
        "[LF] Table 2",
        _SIGMOID_FREE,
    ),
    # [LF] Table 6 / App. C.2 (softmax gate).
    "lf_t6_aux": Setting(
        f"{_LF}, softmax gate, aux loss alpha=3e-4 (their best for softmax)",
        {"val_ppl": 9.604, "maxvio_global": 0.937},
        "[LF] Table 6",
        Recipe("softmax none global_alpha"),
    ),
    "lf_t6_free": Setting(
        f"{_LF}, softmax gate, loss-free bias u=1e-3 (update u*e_i)",
        {"val_ppl": 9.599, "maxvio_global": 0.027},
        "[LF] Table 6",
        Recipe("softmax none bias.rate"),
    ),
    # [LF] sign-update rate sweep (issue 15 cites it as Table 3; the paper plots it in Fig. 4).
    **{
        f"lf_u{u}": Setting(
            f"{_LF}, sigmoid gate, loss-free bias u={u}",
            {"val_ppl": ppl},
            "[LF] Fig. 4",
            Recipe("sigmoid none bias.rate", knob_value=float(u)),
        )
        for u, ppl in (("1e-4", 9.51), ("1e-3", 9.50), ("1e-2", 9.51))
    },
    # Qiu et al. 2501.11873 [Qwen], Table 1: the scope (sequences) the balance is computed over.
    **{
        f"qiu_t1_aux_b{n}": Setting(
            f"{_QIU}, aux loss balanced over {n} sequences", {"val_ppl": ppl}, "[Qwen] Table 1"
        )
        for n, ppl in ((4, 8.167), (32, 8.062), (512, 8.038))
    },
    **{
        f"qiu_t1_free_b{n}": Setting(
            f"{_QIU}, aux-loss-free bias from {n} sequences", {"val_ppl": ppl}, "[Qwen] Table 1"
        )
        for n, ppl in ((4, 8.521), (512, 8.080))
    },
    # [Qwen] Table 4: aux-loss weight.
    **{
        f"qiu_t4_w{w}": Setting(f"{_QIU}, aux loss weight {w}", {"val_ppl": ppl}, "[Qwen] Table 4")
        for w, ppl in (("8e-3", 8.167), ("4e-3", 8.154), ("1e-3", 8.159))
    },
    # DeepSeek-V3 [V3] §4.5.3: balance scope.
    "v3_seq": Setting(
        f"{_V3}, sequence-wise aux loss",
        {"val_loss": 2.258},
        "[V3] §4.5.3",
        Recipe("sigmoid none seq_alpha"),
    ),
    "v3_batch": Setting(
        f"{_V3}, batch-wise aux loss",
        {"val_loss": 2.253},
        "[V3] §4.5.3",
        Recipe("sigmoid none global_alpha"),
    ),
    "v3_free": Setting(
        f"{_V3}, aux-loss-free bias", {"val_loss": 2.253}, "[V3] §4.5.3", _SIGMOID_FREE
    ),
    # [V3] Table 5: Pile-test bits per byte, large MoE (228.7B, 578B tokens).
    "v3_t5_aux": Setting(
        "V3 large MoE, V2's aux losses, sigmoid gate",
        {"val_bpb": 0.656},
        "[V3] Table 5",
        Recipe(f"sigmoid none {_V2_LOSSES}"),
    ),
    "v3_t5_free": Setting(
        "V3 large MoE, aux-loss-free, sigmoid gate",
        {"val_bpb": 0.652},
        "[V3] Table 5",
        _SIGMOID_FREE,
    ),
    # DeepSeek-V2 [V2] §2.2.2: device-limited routing, no numbers published.
    "v2_unrestricted": Setting(
        "V2, top-K over all devices", {}, "[V2] §2.2.2", Recipe(f"softmax none {_V2_LOSSES}")
    ),
    "v2_device_m3": Setting(
        "V2, device-limited routing, M=3",
        {},
        "[V2] §2.2.2",
        Recipe(f"softmax device {_V2_LOSSES}", group_limit=3),
    ),
}
"""Published runs by key: the keys a study's `report.compare_to` may name."""


def match_settings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """strategy -> the published settings whose recipe it follows (`runs`: the rows of
    `summary.load_settings`); a setting two strategies follow goes to the first in
    `strategy_order` (the canonical names first, then by name)."""
    first = runs.drop_duplicates("strategy").set_index("strategy")
    out: dict[str, list[str]] = {}
    for key, setting in SETTINGS.items():
        recipe = setting.recipe
        if recipe is None:
            continue
        strategy = next(
            (s for s in strategy_order(set(first.index)) if recipe.followed_by(first.loc[s])),
            None,
        )
        if strategy is not None:
            out.setdefault(strategy, []).append(key)
    return out


@dataclass(frozen=True)
class Claim:
    """A published finding about two settings on `metric` (lower is better). `lower`: `lhs`
    is below `rhs`. `equal`: `lhs` is within `margin` x (rhs's mean) of `rhs` (an
    equivalence claim; the margin is ours, the paper gives none)."""

    text: str
    kind: Literal["lower", "equal"]
    metric: str
    lhs: str
    rhs: str
    margin: float = 0.0

    def verdict(self, p: Paired) -> str:
        """reproduced / not resolved / contradicted from the paired CI of lhs − rhs (n/a below
        two pairs). `lower`: the CI below zero reproduces, above zero contradicts. `equal`:
        the CI inside ±margin reproduces, entirely outside it contradicts."""
        if p.n < 2:
            return p.verdict
        if self.kind == "lower":
            return {-1: "reproduced", 1: "contradicted", 0: "not resolved"}[p.resolved]
        bound = self.margin * abs(p.rhs)
        lo, hi = p.diff - p.ci95, p.diff + p.ci95
        if -bound <= lo and hi <= bound:
            return "reproduced"
        return "contradicted" if lo > bound or hi < -bound else "not resolved"

    @property
    def source(self) -> str:
        return "; ".join(dict.fromkeys(SETTINGS[k].source for k in (self.lhs, self.rhs)))


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "aux-loss-free beats the aux loss on perplexity",
        "lower",
        "val_ppl",
        "lf_t2_free",
        "lf_t2_aux",
    ),
    Claim(
        "aux-loss-free balances far better globally",
        "lower",
        "maxvio_global",
        "lf_t2_free",
        "lf_t2_aux",
    ),
    Claim(
        "with a softmax gate, aux-loss-free still beats the aux loss",
        "lower",
        "val_ppl",
        "lf_t6_free",
        "lf_t6_aux",
    ),
    Claim(
        "bias rate u=1e-4 is as good as u=1e-3 (within 1%)",
        "equal",
        "val_ppl",
        "lf_u1e-4",
        "lf_u1e-3",
        0.01,
    ),
    Claim(
        "bias rate u=1e-2 is as good as u=1e-3 (within 1%)",
        "equal",
        "val_ppl",
        "lf_u1e-2",
        "lf_u1e-3",
        0.01,
    ),
    Claim(
        "balancing over the global batch beats balancing over a few sequences",
        "lower",
        "val_ppl",
        "qiu_t1_aux_b512",
        "qiu_t1_aux_b4",
    ),
    Claim(
        "a global-batch aux loss beats aux-loss-free",
        "lower",
        "val_ppl",
        "qiu_t1_aux_b512",
        "qiu_t1_free_b512",
    ),
    Claim(
        "aux-loss weight 1e-3 is as good as 8e-3 (within 1%)",
        "equal",
        "val_ppl",
        "qiu_t4_w1e-3",
        "qiu_t4_w8e-3",
        0.01,
    ),
    Claim(
        "a batch-wise aux loss beats the sequence-wise one",
        "lower",
        "val_loss",
        "v3_batch",
        "v3_seq",
    ),
    Claim(
        "aux-loss-free beats the sequence-wise aux loss", "lower", "val_loss", "v3_free", "v3_seq"
    ),
    Claim(
        "batch-wise aux loss and aux-loss-free are as good (within 0.4% of the loss)",
        "equal",
        "val_loss",
        "v3_batch",
        "v3_free",
        0.004,
    ),
    Claim(
        "aux-loss-free has lower bits per byte than aux losses",
        "lower",
        "val_bpb",
        "v3_t5_free",
        "v3_t5_aux",
    ),
    Claim(
        "device-limited routing with M=3 is as good as unrestricted (within 1%)",
        "equal",
        "val_ppl",
        "v2_device_m3",
        "v2_unrestricted",
        0.01,
    ),
)
"""The published claims a study can check (each needs both settings matched)."""
