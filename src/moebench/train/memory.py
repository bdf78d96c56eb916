"""A lower bound of the memory one training process needs, checked against its device before
any work: sizes that cannot fit are refused with the estimate and the fields that drive it,
instead of an out-of-memory error mid-run.

The bound counts only what training certainly holds at once: the parameters with their
gradients and AdamW's two moments (float32, 16 bytes per parameter; this rank's block of
experts under expert parallelism), the float32 logits and their gradient, and four float32
copies of the residual stream per layer kept for the backward pass (this rank's share of
the micro-batch). Real use is higher (attention, expert buffers, the allocator), so a run
the check passes may still not fit; one it refuses cannot.

`study_misfits` checks every grid point of a study on this machine before any job, which is
only meaningful where its runs train here (Snakemake's local executor): a SLURM job's node,
and so its device, is chosen by the cluster when the job starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moebench.config import RunConfig, StudyConfig

GIB = 1 << 30
BYTES_PER_PARAM = 16
"""float32 weight, gradient and AdamW's two moments."""
RESIDUAL_COPIES = 4
"""Residual-stream tensors per layer kept for backward (input, norm, attention, FFN input)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Lower bounds, in bytes, of one process's training memory."""

    params: int
    state_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def estimate(cfg: RunConfig, world_size: int = 1) -> MemoryEstimate:
    """The lower bound of the module docstring for one of `world_size` ranks."""
    m, r, t = cfg.model, cfg.router, cfg.train
    d, vocab = m.d_model, cfg.data.vocab_size
    expert = 3 * d * m.expert_hidden  # gate, up and down projections
    moe_layer = (r.num_experts // world_size + m.n_shared_experts) * expert + d * r.num_experts
    params = (
        2 * vocab * d  # untied embedding and output head
        + m.n_layers * 4 * d * d  # qkv and output projection
        + m.n_dense_layers * 3 * d * m.dense_hidden
        + (m.n_layers - m.n_dense_layers) * moe_layer
    )
    tokens = t.batch_size // world_size * t.seq_len
    activations = 4 * tokens * (2 * vocab + RESIDUAL_COPIES * m.n_layers * d)
    return MemoryEstimate(params, BYTES_PER_PARAM * params, activations)


def device_memory(device: torch.device) -> int:
    """Bytes the device has: a GPU's total memory; for the CPU, physical memory or the
    cgroup's limit, whichever is smaller."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() else "max"
    return min(physical, int(text)) if text.isdigit() else physical


def check_memory(cfg: RunConfig, device: torch.device, world_size: int = 1) -> None:
    """ValueError naming the sizes unless the lower bound fits the device's memory."""
    need, have = estimate(cfg, world_size), device_memory(device)
    if need.total <= have:
        return
    m, t = cfg.model, cfg.train
    if need.state_bytes >= need.activation_bytes:
        fields = (f"model.d_model={m.d_model}, model.n_layers={m.n_layers}, router.num_experts="
                  f"{cfg.router.num_experts}, model.expert_hidden={m.expert_hidden}, "
                  f"model.dense_hidden={m.dense_hidden}, data.vocab_size={cfg.data.vocab_size}")
    else:
        fields = (f"train.batch_size={t.batch_size}, train.seq_len={t.seq_len}, "
                  f"data.vocab_size={cfg.data.vocab_size}")
    raise ValueError(
        f"{fields}: training needs at least {need.total / GIB:.1f} GiB per process "
        f"({need.params:,} parameters with gradients and AdamW state: "
        f"{need.state_bytes / GIB:.1f} GiB; activations: {need.activation_bytes / GIB:.1f} GiB), "
        f"the {device.type} has {have / GIB:.1f} GiB; allowed: sizes whose estimate fits "
        "(moebench.train.memory; the estimate is a lower bound)"
    )


def study_misfits(study: StudyConfig) -> list[str]:
    """`<dataset>/<strategy>: why` for each grid point of `study` that cannot train on this
    machine (`check_memory` on its `train.device`, with `resources.train.tasks` processes);
    seeds share sizes, so one seed is checked."""
    from moebench.train.loop import resolve_device

    misfits = []
    for dataset in sorted(study.datasets):
        for strategy in sorted(study.strategies):
            cfg = study.run_config(dataset, strategy, study.seeds[0])
            try:
                check_memory(cfg, resolve_device(cfg), study.resources.train.tasks)
            except ValueError as err:
                misfits.append(f"{dataset}/{strategy}: {err}")
    return misfits
