"""moebench.model: shapes, the DeepSeekMoE layer formula, loop == grouped expert paths,
float32 router, capacity dropping, NaN detection."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moebench.config import RunConfig
from moebench.model import MoELayer, MoETransformer, NonFiniteRouterError, SwiGLU

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


def test_forward_shapes_and_layer_kinds() -> None:
    cfg = tiny(balance={"expert_alpha": 0.01, "seq_alpha": 1e-3})
    model = MoETransformer(cfg, VOCAB)
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
    cfg = tiny()
    model = MoETransformer(cfg, VOCAB)
    total, active = model.param_counts()
    per_expert = 3 * 32 * 16
    assert total == sum(p.numel() for p in model.parameters()) - VOCAB * 32
    assert total - active == 2 * (16 - 4) * per_expert


def test_moe_layer_matches_the_deepseekmoe_formula() -> None:
    """y_t = shared(u_t) + sum_i g_it FFN_i(u_t) ([V2] eq. 20) recomputed token by token."""
    cfg = tiny(router={"score_fn": "sigmoid", "normalize": True, "route_scale": 2.5})
    torch.manual_seed(0)
    layer = MoELayer(cfg, index=0)
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
            h = F.silu(x_TH[t] @ ex.w1[e]) * (x_TH[t] @ ex.w3[e])
            want = want + routing.weights_TK[t, k] * (h @ ex.w2[e])
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
def test_loop_and_grouped_paths_agree_in_outputs_and_gradients(over: dict[str, Any]) -> None:
    cfg = tiny(balance={"switch_alpha": 0.01, **over.get("balance", {})},
               router=over.get("router", {}))
    results = []
    for impl in ("loop", "grouped"):
        torch.manual_seed(0)
        model = MoETransformer(cfg, VOCAB)
        model.set_expert_impl(impl)
        x = tokens(B=4)
        bias_LE = torch.linspace(-0.05, 0.05, 32).reshape(2, 16)
        out = model(x, x, bias_LE)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.experts_TK, lb.experts_TK)
        assert torch.equal(la.keep_TK, lb.keep_TK)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6, msg=name)
    if "capacity" in over.get("balance", {}):
        assert any(not bool(layer.keep_TK.all()) for layer in a.layers)


def test_dropped_assignments_have_zero_gate_and_eval_drops_nothing() -> None:
    cfg = tiny(balance={"capacity": {"factor": 0.5}})
    model = MoETransformer(cfg, VOCAB)
    x = tokens(B=4)
    out = model(x, x)
    for layer in out.layers:
        assert not bool(layer.keep_TK.all())
        assert bool((layer.weights_TK[~layer.keep_TK] == 0).all())
        assert bool((layer.weights_TK[layer.keep_TK] > 0).all())  # no renormalisation to 0
    model.eval()
    assert all(bool(layer.keep_TK.all()) for layer in model(x, x).layers)


def test_router_runs_in_float32_under_bf16_autocast() -> None:
    model = MoETransformer(tiny(), VOCAB)
    layer = model.moe_layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(torch.randn(8, 32, dtype=torch.bfloat16))
        out = model(tokens(), tokens())
    assert logits.dtype == torch.float32
    assert out.layers[0].scores_TE.dtype == torch.float32


def test_nan_router_logits_name_the_layer() -> None:
    model = MoETransformer(tiny(), VOCAB)
    with torch.no_grad():
        model.moe_layers[1].router.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteRouterError, match="MoE layer 1") as info:
        model(tokens())
    assert info.value.layer == 1


def test_bad_inputs_are_value_errors() -> None:
    model = MoETransformer(tiny(), VOCAB)
    with pytest.raises(ValueError, match=r"train\.seq_len=16"):
        model(tokens(S=17))
    with pytest.raises(ValueError, match="bias_LE has 3 rows"):
        model(tokens(), bias_LE=torch.zeros(3, 16))
    with pytest.raises(ValueError, match="impl='fast'"):
        model.set_expert_impl("fast")
    with pytest.raises(ValueError, match="must be even for RoPE"):
        MoETransformer(tiny(model={"d_model": 30, "n_heads": 2}), VOCAB)
