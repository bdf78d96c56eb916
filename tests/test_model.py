"""moebench.model: a layer built from its own config, shapes, the DeepSeekMoE layer
formula, the CPU expert path == the CUDA path's kernels (Triton interpreter), float32
router, capacity dropping, NaN flags."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moebench.config import BalanceConfig, RunConfig
from moebench.kernels import grouped_experts
from moebench.model import MoEConfig, MoELayer, MoETransformer, SwiGLU, TransformerConfig
from moebench.model.moe import sorted_experts_cpu
from moebench.routing import Layout, RouterConfig

VOCAB = 97


def tiny(**over: Any) -> RunConfig:
    """A 3-layer model (1 dense, 2 MoE) with 16 experts, top-4, on 2 nodes x 2 GPUs."""
    base: dict[str, Any] = {
        "model": {"d_model": 32, "n_layers": 3, "n_heads": 2, "n_dense_layers": 1,
                  "dense_hidden": 64, "expert_hidden": 16, "n_shared_experts": 2},
        "router": {"num_experts": 16, "top_k": 4},
        "topology": {"num_nodes": 2, "gpus_per_node": 2},
        "train": {"seq_len": 16},
    }
    for key, value in over.items():
        base.setdefault(key, {}).update(value)
    return RunConfig.model_validate(base)


def tokens(B: int = 3, S: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def build(cfg: RunConfig) -> MoETransformer:
    return MoETransformer(cfg.transformer_config(VOCAB))


def test_layer_and_decoder_are_built_from_their_own_configs() -> None:
    """No run config: a MoE layer from a `MoEConfig`, the decoder from a
    `TransformerConfig` (nanoGPT's `GPTConfig` style)."""
    moe = MoEConfig(d_model=16, expert_hidden=8, n_shared_experts=1,
                    router=RouterConfig(num_experts=8, top_k=2, score_fn="sigmoid",
                                        normalize=True),
                    layout=Layout.contiguous(8, 2, 2), balance=BalanceConfig(seq_alpha=1e-3),
                    comm_limit=2)
    layer = MoELayer(moe, index=0)
    y, routing, aux = layer(torch.randn(2, 4, 16))
    assert y.shape == (2, 4, 16) and routing.experts_TK.shape == (8, 2)
    assert set(aux) == {"seq"} and bool(routing.finite)
    model = MoETransformer(TransformerConfig(vocab_size=VOCAB, max_seq_len=16, d_model=16,
                                             n_layers=2, n_heads=2, n_dense_layers=1,
                                             dense_hidden=32, init_std=0.02, moe=moe))
    assert model(tokens(S=8)).logits.shape == (3, 8, VOCAB)


def test_forward_shapes_and_layer_kinds() -> None:
    cfg = tiny(balance={"expert_alpha": 0.01, "seq_alpha": 1e-3})
    model = build(cfg)
    x = tokens()
    out = model(x, x)
    assert out.logits.shape == (3, 16, VOCAB)
    assert out.ce_loss is not None and out.ce_loss.dim() == 0
    assert set(out.aux) == {"expert", "seq"}
    assert len(out.layers) == model.num_moe_layers == 2
    assert isinstance(model.blocks[0].ffn, SwiGLU)
    assert all(isinstance(b.ffn, MoELayer) for b in model.blocks[1:])
    for layer in out.layers:
        assert layer.experts_TK.shape == (48, 4) and layer.experts_TK.dtype == torch.int64
        assert layer.scores_TE.shape == (48, 16) and layer.scores_TE.dtype == torch.float32
        assert bool(layer.keep_TK.all())
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux["expert"] + out.aux["seq"])
    model.eval()
    assert model(x, x).aux == {}  # balance losses are a training objective only


def test_param_counts_active_excludes_unused_experts() -> None:
    model = build(tiny())
    total, active = model.param_counts()
    per_expert = 3 * 32 * 16
    assert total == sum(p.numel() for p in model.parameters()) - VOCAB * 32
    assert total - active == 2 * (16 - 4) * per_expert


def test_moe_layer_matches_the_deepseekmoe_formula() -> None:
    """y_t = shared(u_t) + sum_i g_it FFN_i(u_t) ([V2] eq. 20) recomputed token by token."""
    cfg = tiny(router={"score_fn": "sigmoid", "normalize": True, "route_scale": 2.5})
    torch.manual_seed(0)
    layer = MoELayer(cfg.transformer_config(VOCAB).moe, index=0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32)
    y, routing, _ = layer(x)
    ex = layer.experts
    x_TH = x.reshape(10, 32)
    for t in range(10):
        want = layer.shared(x_TH[t])
        for k in range(4):
            e = int(routing.experts_TK[t, k])
            h = F.silu(x_TH[t] @ ex.w_gate[e]) * (x_TH[t] @ ex.w_up[e])
            want = want + routing.weights_TK[t, k] * (h @ ex.w_down[e])
        torch.testing.assert_close(y.reshape(10, 32)[t], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.full((10,), 2.5))


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"router": {"limit": "node", "group_limit": 1, "score_fn": "sigmoid"}},
        {"balance": {"capacity": {"factor": 1.0}}},
        {"balance": {"capacity": {"factor": 1.0, "level": "device", "protected_frac": 0.5}}},
    ],
    ids=["plain", "node_limited", "expert_capacity", "device_capacity"],
)
def test_cpu_path_and_cuda_kernels_agree_in_outputs_and_gradients(over: dict[str, Any]) -> None:
    """The CPU expert path (kept assignments, segment matmuls, ordered index_add) and the CUDA
    path's function (`grouped_experts`: Triton row movement, packed gate/up GEMM, zero gates
    for dropped assignments), run here in Triton's interpreter, compute the same function."""
    cfg = tiny(balance={"switch_alpha": 0.01, **over.get("balance", {})},
               router=over.get("router", {}))
    torch.manual_seed(0)
    model = build(cfg)
    x = tokens(B=4)
    out = model(x, x, torch.linspace(-0.05, 0.05, 32).reshape(2, 16))
    h = torch.randn(64, 32)
    dy = torch.randn(64, 32)
    for routing, layer in zip(out.layers, model.moe_layers, strict=True):
        ex = layer.experts
        results = []
        for cuda_path in (False, True):
            leaves = [t.detach().clone().requires_grad_()
                      for t in (h, routing.weights_TK, ex.w_gate, ex.w_up, ex.w_down)]
            args = (leaves[0], routing.experts_TK, leaves[1] * routing.keep_TK)
            y = (grouped_experts(*args, *leaves[2:], triton_kernels=True) if cuda_path
                 else sorted_experts_cpu(*args, routing.keep_TK, *leaves[2:]))
            results.append((y, *torch.autograd.grad(y, leaves, dy)))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if "capacity" in over.get("balance", {}):
        assert any(not bool(layer.keep_TK.all()) for layer in out.layers)


def test_dropped_assignments_have_zero_gate_and_eval_drops_nothing() -> None:
    cfg = tiny(balance={"capacity": {"factor": 0.5}})
    model = build(cfg)
    x = tokens(B=4)
    out = model(x, x)
    for layer in out.layers:
        assert not bool(layer.keep_TK.all())
        assert bool((layer.weights_TK[~layer.keep_TK] == 0).all())
        assert bool((layer.weights_TK[layer.keep_TK] > 0).all())  # no renormalisation to 0
    model.eval()
    assert all(bool(layer.keep_TK.all()) for layer in model(x, x).layers)


def test_router_runs_in_float32_under_bf16_autocast() -> None:
    model = build(tiny())
    layer = model.moe_layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(torch.randn(8, 32, dtype=torch.bfloat16))
        out = model(tokens(), tokens())
    assert logits.dtype == torch.float32
    assert out.layers[0].scores_TE.dtype == torch.float32


def test_nan_router_logits_are_flagged_per_layer_without_raising() -> None:
    """The forward never syncs to look: it flags the layer (the trainer checks once a step)."""
    model = build(tiny())
    with torch.no_grad():
        model.moe_layers[1].router.weight[3, 0] = float("nan")
    out = model(tokens())
    assert [bool(r.finite) for r in out.layers] == [True, False]


def test_bad_inputs_are_value_errors() -> None:
    model = build(tiny())
    with pytest.raises(ValueError, match=r"train\.seq_len=16"):
        model(tokens(S=17))
    with pytest.raises(ValueError, match="bias_LE has 3 rows"):
        model(tokens(), bias_LE=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="must be even for RoPE"):
        build(tiny(model={"d_model": 30, "n_heads": 2}))


@pytest.mark.slow
def test_compiled_dense_parts_equal_eager_in_loss_and_gradients() -> None:
    """`compile_dense` (train.compile) changes how the dense parts run, not what they compute;
    evaluation stays eager."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build(tiny(balance={"seq_alpha": 1e-3}))
        if compiled:
            model.compile_dense()
        x = tokens(B=2)
        out = model(x, x)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)
