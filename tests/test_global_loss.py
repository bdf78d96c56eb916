"""The global-batch loss's running count (docs/global_loss.md) and the ST-MoE router z-loss:
hand-worked examples with exact fractions (float64, dyadic numbers, so every operation is
exact), the reset once per optimizer step, and 2 gloo processes against one process."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from local_servers import free_port
from moebench.balancing import z_loss
from moebench.config import RunConfig
from moebench.model import ExpertParallel, MoELayer

F64 = torch.float64


def make_layer(**balance: Any) -> MoELayer:
    """A MoE layer of 4 experts top-1 on 1 node x 2 GPUs, sigmoid router; f counts the
    routing passed in."""
    return MoELayer(layer_cfg(**balance).transformer_config(300).moe, index=0)


def layer_cfg(**balance: Any) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"d_model": 8, "n_layers": 2, "n_heads": 2, "n_dense_layers": 1,
                  "expert_hidden": 4, "n_shared_experts": 0},
        "router": {"num_experts": 4, "top_k": 1, "score_fn": "sigmoid", "normalize": True},
        "topology": {"num_nodes": 1, "gpus_per_node": 2},
        "balance": {"aux_counts": "actual", **balance},
    })


# Two micro-batches of two tokens; every score row sums to 1, so s' = s (eq. 19).
MB1_S = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 8], [1 / 4, 1 / 2, 1 / 8, 1 / 8]], dtype=F64)
MB1_E = torch.tensor([[0], [1]])
MB2_S = torch.tensor([[1 / 2, 1 / 4, 1 / 8, 1 / 8], [5 / 8, 1 / 8, 1 / 8, 1 / 8]], dtype=F64)
MB2_E = torch.tensor([[0], [0]])


def test_running_count_over_two_micro_batches_by_hand() -> None:
    """Micro-batch 1: c = [1,1,0,0], f = 4c/2 = [2,2,0,0], P = [3/8,3/8,1/8,1/8]: 3/2.
    Micro-batch 2: c = [1,1,0,0] + [2,0,0,0] = [3,1,0,0], f = 4c/4 = [3,1,0,0],
    P = [9/16,3/16,1/8,1/8]: 27/16 + 3/16 = 15/8 (its own counts alone give f = [4,0,0,0]
    and 9/4). The step's loss is the mean over micro-batches, 27/16. After the reset the
    first micro-batch gives 3/2 again."""
    layer = make_layer(global_alpha=1.0)
    logits = torch.zeros(2, 4)
    first = layer.aux_losses(MB1_S, MB1_E, 2, logits)["global"]
    second = layer.aux_losses(MB2_S, MB2_E, 2, logits)["global"]
    assert Fraction(float(first)) == Fraction(3, 2)
    assert Fraction(float(second)) == Fraction(15, 8)
    assert Fraction(float(first + second)) / 2 == Fraction(27, 16)
    assert layer.global_counts_E.tolist() == [3, 1, 0, 0]
    layer.reset_global_counts()
    assert layer.global_counts_E.tolist() == [0, 0, 0, 0]
    assert Fraction(float(layer.aux_losses(MB2_S, MB2_E, 2, logits)["global"])) == Fraction(9, 4)


def test_alpha_scales_and_other_losses_leave_the_count_alone() -> None:
    layer = make_layer(global_alpha=0.5, seq_alpha=1.0)
    aux = layer.aux_losses(MB1_S, MB1_E, 2, torch.zeros(2, 4))
    assert Fraction(float(aux["global"])) == Fraction(3, 4)
    off = make_layer(seq_alpha=1.0)
    off.aux_losses(MB1_S, MB1_E, 2, torch.zeros(2, 4))
    assert off.global_counts_E.tolist() == [0, 0, 0, 0]  # no global loss: nothing counted


def test_training_resets_the_count_once_per_optimizer_step(tmp_path: Path) -> None:
    """train_step starts every step from a zero count: after a step with grad_accum 2 the
    count holds exactly that step's 2 micro-batches of selections, K per token."""
    from moebench.config import DataConfig
    from moebench.data import prepare as prepare_data
    from moebench.train import Trainer, prepare

    data = DataConfig(source="synthetic", vocab_size=300, synthetic_docs=40,
                      synthetic_doc_tokens=64)
    prepare_data(data, tmp_path / "data", seed=0)
    cfg = RunConfig.model_validate({
        "data_dir": str(tmp_path / "data"), "data": data.model_dump(), "tracking": {"uri": None},
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "dense_hidden": 32,
                  "expert_hidden": 8},
        "router": {"num_experts": 8, "top_k": 2},
        "topology": {"num_nodes": 1, "gpus_per_node": 2},
        "balance": {"global_alpha": 1e-2},
        "train": {"steps": 3, "batch_size": 2, "grad_accum": 2, "seq_len": 16,
                  "warmup_steps": 1, "eval_batches": 1, "trace_tokens": 16},
    })
    trainer = Trainer(prepare(cfg, tmp_path / "run", tmp_path / "ckpt"))
    (layer,) = trainer.model.moe_layers
    for _ in range(2):
        trainer.train_step()
        assert int(layer.global_counts_E.sum()) == 2 * 2 * 16 * 2  # micro x batch x S x K


def test_z_loss_by_hand() -> None:
    """Rows with logsumexp 3 and -1: z = (9 + 1) / 2 = 5; gradient 2 lse softmax / T."""
    p_TE = torch.tensor([[1 / 4, 3 / 4], [1 / 2, 1 / 2]], dtype=F64)
    logits_TE = (p_TE.log() + torch.tensor([[3.0], [-1.0]], dtype=F64)).requires_grad_()
    loss = z_loss(logits_TE)
    assert float(loss.detach()) == pytest.approx(5.0, rel=1e-14)
    loss.backward()
    expected = 2 * torch.tensor([[3.0], [-1.0]], dtype=F64) * p_TE / 2
    torch.testing.assert_close(logits_TE.grad, expected)
    assert z_loss(torch.zeros(3, 4)).dtype == torch.float32
    assert float(z_loss(torch.zeros(3, 4))) == pytest.approx(math.log(4) ** 2)
    with pytest.raises(ValueError, match="logits_TE"):
        z_loss(torch.zeros(4))


def test_z_loss_in_the_layer_uses_the_raw_logits() -> None:
    layer = make_layer(z_alpha=1e-3)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(4.0), 0.0, 0.0, 0.0]])
    aux = layer.aux_losses(torch.sigmoid(logits), torch.tensor([[0], [0]]), 2, logits)
    lse = torch.tensor([math.log(4.0), math.log(7.0)])
    assert set(aux) == {"z"}
    assert float(aux["z"]) == pytest.approx(1e-3 * float(lse.square().mean()), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.floats(-20, 20), st.integers(0, 2**31 - 1))
def test_z_loss_shift_property(shift: float, seed: int) -> None:
    """Adding c to every logit of a token adds c to its logsumexp."""
    logits_TE = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed), dtype=F64)
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    assert float(z_loss(logits_TE + shift)) == pytest.approx(
        float((lse_T + shift).square().mean()), rel=1e-9, abs=1e-12)


# ---- 2 gloo processes against one process ---------------------------------------------------
B, S, H = 4, 4, 8


def _batches() -> list[torch.Tensor]:
    """Two micro-batches of the global batch [B, S, H]."""
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(B, S, H, generator=gen) for _ in range(2)]


def _run_layer(rank: int | None) -> dict[str, Any]:
    """Two micro-batches through a fresh layer (seed 0): per-micro-batch global loss, the
    running count and the router gradient of the summed loss. `rank`: this rank's half of
    each batch under expert parallelism (None: one process, the whole batch)."""
    torch.manual_seed(0)
    layer = make_layer(global_alpha=1.0)
    if rank is not None:
        layer.experts.shard(ExpertParallel(layer.cfg.layout, rank, world_size=2))
    layer.train()
    losses = []
    for x_BSH in _batches():
        rows = slice(None) if rank is None else slice(rank * B // 2, (rank + 1) * B // 2)
        _, _, aux = layer(x_BSH[rows])
        aux["global"].backward()
        losses.append(float(aux["global"].detach()))
    grad = layer.router.weight.grad.clone()
    if rank is not None:  # data parallel: the mean of the ranks' gradients
        dist.all_reduce(grad)
        grad /= 2
    return {"losses": losses, "counts": layer.global_counts_E.tolist(), "grad": grad}


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_run_layer(rank), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_give_the_single_process_global_loss(tmp_path: Path) -> None:
    """Each rank's f comes from the count summed over both ranks and the micro-batches so far;
    P from its own half. The mean of the two ranks' losses is the one-process loss of each
    micro-batch, the counts agree, and so does the data-parallel gradient."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    single = _run_layer(None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert single["counts"] == ranks[0]["counts"] == ranks[1]["counts"]
    assert sum(single["counts"]) == 2 * B * S  # top-1, two micro-batches
    for m in range(2):
        mean = (ranks[0]["losses"][m] + ranks[1]["losses"][m]) / 2
        assert mean == pytest.approx(single["losses"][m], rel=1e-6)
    torch.testing.assert_close(ranks[0]["grad"], single["grad"], rtol=1e-5, atol=1e-7)
