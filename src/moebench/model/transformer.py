"""A small DeepSeekMoE decoder ([DSMoE], [V2] §2, [V3] §2.1): pre-norm blocks of RoPE
causal self-attention and a feed-forward network; the first `n_dense_layers` FFNs are dense
SwiGLUs ([V2] §3.1.2, [V3] §4.2), the others `MoELayer`s (shared + routed experts).

Choices (ours, documented): standard multi-head attention instead of MLA (the routing study
does not depend on the attention variant); RMSNorm ([V2], [V3]); every weight drawn from
N(0, init_std) ([V2] §3.1.2 uses one std for all weights); untied input embedding and output
head, as DeepSeek's released configs (`tie_word_embeddings = false` [HF-cfg]), which also
keeps the embedding out of the MFU FLOP count.

Legend: B batch, S sequence length, H d_model, V vocabulary, L MoE layers, E routed
experts, T = B * S tokens, nh heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.balancing import protected_sequences
from moebench.comm.alltoall import PhaseTimer
from moebench.model.moe import ExpertParallel, LayerRouting, MoEConfig, MoELayer, SwiGLU


@dataclass(frozen=True)
class TransformerConfig:
    """The decoder's shape; `moe` configures every MoE layer (the FFN of each layer after the
    first `n_dense_layers`). `drop_seed` seeds the draw of the sequences protected from
    device-level dropping."""

    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    n_dense_layers: int
    dense_hidden: int
    init_std: float
    moe: MoEConfig
    drop_seed: int = 1


@dataclass
class ModelOutput:
    """`logits` [B, S, V]; `ce_loss` (mean next-token cross-entropy, None without targets);
    `aux`: alpha-weighted balance losses summed over MoE layers, by name (training only);
    `layers`: the routing of every MoE layer, in order."""

    logits: Tensor
    ce_loss: Tensor | None
    aux: dict[str, Tensor] = field(default_factory=dict)
    layers: list[LayerRouting] = field(default_factory=list)

    @property
    def loss(self) -> Tensor:
        """The training objective: cross-entropy plus every balance loss."""
        if self.ce_loss is None:
            raise ValueError("ModelOutput.loss needs targets; forward() was called without them")
        return self.ce_loss + sum(self.aux.values(), torch.zeros_like(self.ce_loss))


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [S, hd/2] of rotary position embeddings [RoFormer, Su et al. 2021]."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SF.cos(), angles_SF.sin()


def apply_rope(x_BnSd: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of every head by the position's angle."""
    x = x_BnSd.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos_SF - x1 * sin_SF, x0 * sin_SF + x1 * cos_SF), dim=-1)
    return out.flatten(-2).to(x_BnSd.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE through `F.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSH: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
        B, S, H = x_BSH.shape  # B may be 0 (a rank's empty share of an evaluation batch)
        q, k, v = (self.qkv(x_BSH).view(B, S, 3, self.n_heads, H // self.n_heads)
                   .permute(2, 0, 3, 1, 4))
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, H))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ffn_norm = nn.RMSNorm(d_model)
        self.ffn = ffn

    def attention(self, x_BSH: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
        """x + attn(norm(x)): the attention half of the block."""
        return x_BSH + self.attn(self.attn_norm(x_BSH), cos_SF, sin_SF)

    def dense_ffn(self, x_BSH: Tensor) -> Tensor:
        """x + ffn(norm(x)) for a dense FFN."""
        return x_BSH + self.ffn(self.ffn_norm(x_BSH))


class MoETransformer(nn.Module):
    """Decoder-only LM of `cfg` (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        head_dim = cfg.d_model // cfg.n_heads
        if head_dim % 2:
            raise ValueError(
                f"model.d_model / model.n_heads = {head_dim} must be even for RoPE; "
                f"got d_model={cfg.d_model}, n_heads={cfg.n_heads}"
            )
        if cfg.vocab_size < 1:
            raise ValueError(f"vocab_size={cfg.vocab_size} is invalid; allowed: >= 1")
        self.cfg = cfg
        self.max_seq_len = cfg.max_seq_len
        self.capacity = cfg.moe.balance.capacity
        # Draws the sequences protected from device-level dropping ([V2] §2.2.4: ~10%,
        # a seeded Bernoulli per sequence, docs/balancing.md §7.3); part of a checkpoint.
        self.drop_generator = torch.Generator().manual_seed(cfg.drop_seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList()
        for i in range(cfg.n_layers):
            dense = i < cfg.n_dense_layers
            ffn = (SwiGLU(cfg.d_model, cfg.dense_hidden) if dense
                   else MoELayer(cfg.moe, index=i - cfg.n_dense_layers))
            self.blocks.append(Block(cfg.d_model, cfg.n_heads, ffn))
        self.moe_layers = [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]
        self.ep: ExpertParallel | None = None
        self._compiled: tuple[list, list, object] | None = None
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos_SF, sin_SF = rope_tables(self.max_seq_len, head_dim)
        self.cos_SF: Tensor
        self.sin_SF: Tensor
        self.register_buffer("cos_SF", cos_SF, persistent=False)
        self.register_buffer("sin_SF", sin_SF, persistent=False)
        for name, p in self.named_parameters():
            if not name.endswith("norm.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def shard_experts(self, ep: ExpertParallel) -> None:
        """Keep only this rank's routed experts in every MoE layer and route through the
        expert-parallel all-to-all (see `moebench.model.moe`). Call it once, before the
        optimizer is built; the full model must have been initialised first (same seed on
        every rank), so each shard holds the single-process run's initial weights."""
        if self.ep is not None:
            raise ValueError("shard_experts was already called; allowed: once per model")
        self.ep = ep
        for layer in self.moe_layers:
            layer.experts.shard(ep)

    def _protected(self, B: int, S: int, device: torch.device) -> Tensor | None:
        """bool [T]: tokens of the sequences exempt from device-level dropping, the same
        sequences in every layer; None unless training with device-level capacity. Under
        expert parallelism the draw covers all W * B sequences of the global batch (the
        generator advances as in one process) and this rank takes its B."""
        cap = self.capacity
        if not (self.training and cap.factor is not None and cap.level == "device"):
            return None
        W, r = (1, 0) if self.ep is None else (self.ep.world_size, self.ep.rank)
        drawn_T = protected_sequences(W * B * S, S, cap.protected_frac, self.drop_generator)
        return drawn_T[r * B * S : (r + 1) * B * S].to(device)

    def forward(self, tokens_BS: Tensor, targets_BS: Tensor | None = None,
                bias_LE: Tensor | None = None, timer: PhaseTimer | None = None) -> ModelOutput:
        """Logits, cross-entropy (if `targets_BS`), balance losses and per-layer routing.

        `bias_LE` is the aux-loss-free bias, one row per MoE layer (None = no bias); `timer`
        times the expert-parallel phases (summed over layers)."""
        B, S = tokens_BS.shape
        if self.max_seq_len < S:
            raise ValueError(
                f"sequence length {S} exceeds train.seq_len={self.max_seq_len} of the model"
            )
        L = self.num_moe_layers
        if bias_LE is not None and bias_LE.shape[0] != L:
            raise ValueError(f"bias_LE has {bias_LE.shape[0]} rows; allowed: {L} (MoE layers)")
        cos_SF, sin_SF = self.cos_SF[:S], self.sin_SF[:S]
        protected_T = self._protected(B, S, tokens_BS.device)
        x = self.embed(tokens_BS)
        aux: dict[str, Tensor] = {}
        layers: list[LayerRouting] = []
        fast = self.training and self._compiled is not None
        attention, dense_ffn, head = self._compiled if fast else (  # type: ignore[misc]
            [b.attention for b in self.blocks], [b.dense_ffn for b in self.blocks],
            self.logits_and_loss)
        for i, block in enumerate(self.blocks):
            x = attention[i](x, cos_SF, sin_SF)
            if isinstance(block.ffn, MoELayer):
                bias_E = None if bias_LE is None else bias_LE[block.ffn.index]
                y, routing, layer_aux = block.ffn(block.ffn_norm(x), bias_E, protected_T, timer)
                layers.append(routing)
                for name, value in layer_aux.items():
                    aux[name] = aux[name] + value if name in aux else value
                x = x + y
            else:
                x = dense_ffn[i](x)
        logits, ce_loss = head(x, targets_BS)
        return ModelOutput(logits, ce_loss, aux, layers)

    def logits_and_loss(self, x_BSH: Tensor, targets_BS: Tensor | None
                        ) -> tuple[Tensor, Tensor | None]:
        """Logits of the final norm and head; mean next-token cross-entropy in float32."""
        logits = self.head(self.norm(x_BSH))
        if targets_BS is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten())

    def compile_dense(self) -> None:
        """`torch.compile` the parts outside the routed experts (each block's attention half,
        the dense FFNs, the head and loss) for training steps, where shapes are fixed; the
        routed experts stay eager (their Triton kernels and grouped GEMMs are fused already).
        Evaluation runs eager (its last batch may be shorter)."""
        self._compiled = (
            [torch.compile(b.attention) for b in self.blocks],
            [torch.compile(b.dense_ffn) for b in self.blocks],
            torch.compile(self.logits_and_loss),
        )

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token) parameters, both without the input embedding table
        (a lookup, no FLOPs); active counts top_k of the E routed experts of each layer."""
        total = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel()
        inactive = 0
        for layer in self.moe_layers:
            E, K = layer.router_cfg.num_experts, layer.router_cfg.top_k
            routed = sum(p.numel() for p in layer.experts.parameters())
            inactive += routed * (E - K) // E
        return total, total - inactive
