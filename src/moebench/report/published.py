"""Published numbers printed beside ours, copied from the cited tables
(docs/published.md; source keys expanded in docs/references.md).

The published models are 1B-236B parameters trained on 10^11-10^12 tokens; moebench runs are
orders of magnitude smaller, so only the directions and rough sizes of the gaps are
comparable (DIRECTIONS), never the absolute values. Each number is keyed by the moebench
strategy name (README, Strategies) that implements the method; `setting` says how the published
run differs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One published value of one metric for the method a moebench strategy implements."""

    strategy: str
    metric: str
    value: float
    setting: str
    source: str


_LF_1B = "1B MoE, 100B tokens, sigmoid gate"
_LF_3B = "3B MoE, 200B tokens, sigmoid gate"
_LF_CTRL = "loss-controlled, alpha=1e-3 (our aux_loss: Switch form, softmax, alpha=1e-2)"
_V3_BATCH = "validation loss, own corpus and tokenizer"

PUBLISHED: tuple[Published, ...] = (
    # [LF] Table 2: loss-controlled vs loss-free.
    Published("aux_loss", "val_ppl", 9.56, f"{_LF_1B}; {_LF_CTRL}", "[LF] Table 2"),
    Published("aux_loss", "maxvio_global", 0.72, f"{_LF_1B}; {_LF_CTRL}", "[LF] Table 2"),
    Published("aux_loss", "val_ppl", 7.97, f"{_LF_3B}; {_LF_CTRL}", "[LF] Table 2"),
    Published("aux_loss", "maxvio_global", 0.52, f"{_LF_3B}; {_LF_CTRL}", "[LF] Table 2"),
    Published("aux_free", "val_ppl", 9.50, f"{_LF_1B}; loss-free, u=1e-3", "[LF] Table 2"),
    Published("aux_free", "maxvio_global", 0.04, f"{_LF_1B}; loss-free, u=1e-3", "[LF] Table 2"),
    Published("aux_free", "val_ppl", 7.92, f"{_LF_3B}; loss-free, u=1e-3", "[LF] Table 2"),
    Published("aux_free", "maxvio_global", 0.04, f"{_LF_3B}; loss-free, u=1e-3", "[LF] Table 2"),
    # [V3] §4.5.3: sequence-wise aux loss vs aux-loss-free vs batch-wise aux loss.
    Published("seq_aux", "val_loss", 2.258, f"1B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    Published("aux_free", "val_loss", 2.253, f"1B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    Published("global_aux", "val_loss", 2.253, f"1B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    Published("seq_aux", "val_loss", 2.085, f"3B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    Published("aux_free", "val_loss", 2.080, f"3B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    Published("global_aux", "val_loss", 2.080, f"3B MoE; {_V3_BATCH}", "[V3] §4.5.3"),
    # [V3] Table 5: Pile-test bits per byte, aux-loss-based (V2 loss strengths) vs free.
    Published(
        "aux_loss_v2",
        "val_bpb",
        0.656,
        "Large MoE 228.7B, 578B tokens, sigmoid; V2 losses 0.003/0.05/0.02; Pile-test",
        "[V3] Table 5",
    ),
    Published(
        "aux_free",
        "val_bpb",
        0.652,
        "Large MoE 228.7B, 578B tokens, sigmoid, no aux loss; Pile-test",
        "[V3] Table 5",
    ),
)


@dataclass(frozen=True)
class Direction:
    """A published claim about two strategies that a small study can check: `lhs` is expected
    to have a lower mean `metric` than `rhs`."""

    claim: str
    metric: str
    lhs: str
    rhs: str
    source: str


DIRECTIONS: tuple[Direction, ...] = (
    Direction(
        "aux-loss-free balances far better globally than an aux loss",
        "maxvio_global",
        "aux_free",
        "aux_loss",
        "[LF] Table 2 (0.04 vs 0.52-0.72)",
    ),
    Direction(
        "aux-loss-free has lower perplexity than an aux loss",
        "val_ppl",
        "aux_free",
        "aux_loss",
        "[LF] Table 2; [V3] Table 5",
    ),
    Direction(
        "batch-wise aux loss beats the sequence-wise one",
        "val_loss",
        "global_aux",
        "seq_aux",
        "[V3] §4.5.3",
    ),
    Direction(
        "aux-loss-free beats the sequence-wise aux loss",
        "val_loss",
        "aux_free",
        "seq_aux",
        "[V3] §4.5.3",
    ),
    Direction(
        "the device limit lowers the devices a token reaches",
        "devices_per_token",
        "device_limited",
        "aux_loss_v2",
        "[V2] §2.2.2",
    ),
    Direction(
        "the node limit lowers inter-node (IB) traffic per token",
        "ib_bytes_per_token",
        "node_limited",
        "aux_free",
        "[V3] §3.2.2",
    ),
)


def published_for(strategy: str) -> list[Published]:
    """Published values for the method `strategy` implements (empty if none)."""
    return [p for p in PUBLISHED if p.strategy == strategy]
