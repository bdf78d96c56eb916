"""Distributed training: data parallel over all ranks, routed experts sharded over the same
ranks (expert parallel), on torch.distributed (gloo on CPU, NCCL on GPU).

ProcessLaunch (`ProcessLaunch.from_env`): under torchrun, RANK / WORLD_SIZE / LOCAL_RANK and
its store (init_method "env://"); under srun (a job step: SLURM_STEP_ID set), SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID, MASTER_ADDR = the first host of SLURM_STEP_NODELIST
and MASTER_PORT = 10000 + (job id + step id) mod 50000, unless MASTER_ADDR / MASTER_PORT are
set; anything else (a plain process, a batch script, `srun -n 1`) is one process, the
single-process path. Run it as `torchrun --no-python --nproc-per-node N moebench train ...`
or `srun -n N --kill-on-bad-exit=1 moebench train ...`; a rank that fails makes torchrun
(or srun with --kill-on-bad-exit) end the others, which otherwise wait in a collective.

Layout: the world size W must be 1 or topology.num_nodes x topology.gpus_per_node: rank r is
GPU r of the `Layout` (node r // gpus_per_node) and holds its E / W routed experts; all
ranks form one group that is both the data-parallel and the expert-parallel group. The
nodes are those of the layout: four processes on one machine stand for 2 nodes x 2 GPUs
(the link classes of the byte accounting follow the layout, not the hardware).

Batch split: train.batch_size is the GLOBAL micro-batch B (divisible by W). Every rank
draws the same B windows from the same generator as the single-process run and keeps rows
[r B/W, (r+1) B/W), so the global batch is the single-process batch, token for token, and
the data order and its checkpointed generator are independent of W. Evaluation and the
routing trace split each batch of consecutive windows the same way (`torch.tensor_split`:
shares may differ by one window, or be empty).

Gradients: each rank back-propagates its own mean loss (cross-entropy over its tokens plus
its balance losses). Replicated (non-expert) gradients are all-reduced and divided by W;
an expert's gradient, which already sums the contributions of every rank's tokens through
the all-to-all's backward, is divided by W. Both are then the gradient of the mean over
ranks of the rank losses, which is the single-process loss (equal shares). The clipping
norm is the norm over all parameters (replicated once, experts over their shards), so every
rank clips by the same factor.

Balancing over the global batch: the bias controller's loads are all-reduced before its one
update per optimizer step (identical on every rank); switch and global losses take f from
the micro-batch's counts all-reduced over ranks; the per-sequence losses (expert, device,
comm, seq) average over each rank's whole sequences, and averaging over ranks makes their
mean over all B. Capacity is per rank and micro-batch (`moebench.model.moe`): T in the
capacity formula counts the rank's B/W sequences, so with a capacity factor a distributed
run drops differently from one process (the protected sequences of device-level dropping
are still drawn for the global batch). Without capacity dropping a distributed run equals
the single-process run up to float rounding (summation order of the gates, all-reduces).

Checkpoints are gathered: rank 0 writes the single-process format (full expert tensors
and their AdamW moments, gathered with all_gather) to `last.pt`, atomically, and every rank
reads it back and keeps its shard. A checkpoint therefore resumes under any world size
(including 1); --ckpt-dir must be a directory all ranks share.

All-to-all accounting (`A2AMeter`): on logged steps, per phase, the forward all-to-all's
measured wall time (max over ranks) and rows and bytes sent over NVLink / IB (summed over
ranks, split by the layout's nodes), beside `moebench.comm.traffic`'s prediction for the
same routing (the run's dispatcher, `topology.dispatcher`; assignments dropped by capacity,
which stay home, are counted as copies to the token's own GPU, i.e. free under both) and
its bandwidth-model time at the default link speeds ([V3] §3.2.2).

Legend: W ranks, E routed experts, K experts per token, T tokens of a rank, L MoE layers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moebench.comm.accounting import summarize, traffic
from moebench.comm.alltoall import LINKS, PHASES, A2AStats, PhaseTimer
from moebench.comm.topology import Topology
from moebench.config import RunConfig
from moebench.model import ExpertParallel, MoETransformer

_NODE_RANGES = re.compile(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03"."""
    m = _NODE_RANGES.match(nodelist.strip())
    if not nodelist.strip() or m is None:
        raise ValueError(f"node list {nodelist!r} is invalid; allowed: SLURM's host list syntax")
    prefix, ranges, suffix = m.groups()
    first = re.split(r"[-,]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def _env_int(env: Mapping[str, str], name: str, low: int = 0) -> int:
    raw = env.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={raw!r} is invalid; allowed: an "
                         f"integer >= {low}") from None
    if value < low:
        raise ValueError(f"environment variable {name}={value} is invalid; allowed: >= {low}")
    return value


@dataclass(frozen=True)
class ProcessLaunch:
    """Who this process is, as its launcher says (see the module docstring).

    `launcher`: "torchrun", "slurm" or "single"; `master_addr` / `master_port` are the
    rendezvous of SLURM runs (torchrun's own store is used under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProcessLaunch:
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            world = _env_int(env, "WORLD_SIZE", 1)
            rank, local = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
            launch = cls(rank, world, local, "torchrun")
        elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
            world = _env_int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env
                             else "SLURM_NTASKS", 1)
            if world == 1:
                return cls()
            nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                           "SLURM_NODELIST") if k in env), None)
            addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else None)
            if addr is None:
                raise ValueError("SLURM_STEP_NODELIST and MASTER_ADDR are unset; allowed: a "
                                 "srun job step (or MASTER_ADDR set)")
            if "MASTER_PORT" in env:
                port = _env_int(env, "MASTER_PORT", 1)
            else:
                job, step = _env_int(env, "SLURM_JOB_ID"), _env_int(env, "SLURM_STEP_ID")
                port = 10000 + (job + step) % 50000
            launch = cls(_env_int(env, "SLURM_PROCID"), world, _env_int(env, "SLURM_LOCALID"),
                         "slurm", addr, port)
        else:
            return cls()
        if not 0 <= launch.rank < launch.world_size:
            raise ValueError(f"rank={launch.rank} is invalid; allowed: 0 <= rank < world size "
                             f"{launch.world_size}")
        return launch


def check_world(cfg: RunConfig, world_size: int) -> None:
    """ValueError unless `world_size` ranks can run `cfg` (see the module docstring)."""
    E = cfg.router.num_experts
    if E % world_size:
        allowed = [w for w in range(1, E + 1) if E % w == 0]
        raise ValueError(
            f"the launcher started {world_size} processes; allowed: a divisor of "
            f"router.num_experts={E} ({allowed}): each rank holds an equal block of experts"
        )
    if cfg.train.batch_size % world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is invalid for {world_size} ranks; "
            f"allowed: a multiple of {world_size} (the global micro-batch is split evenly)"
        )


class Parallel:
    """This rank's part of a distributed run: its `ExpertParallel` and the collectives the
    trainer needs (gradient averaging, global clipping, reductions, gathered checkpoints)."""

    def __init__(self, cfg: RunConfig, launch: ProcessLaunch, device: torch.device,
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world_size = launch.rank, launch.world_size
        self.device = device
        self.group = group
        self.ep = ExpertParallel(cfg.layout(), self.rank, self.world_size, group,
                                 cfg.topology.dispatcher, cfg.topology.a2a_capacity_factor)
        self.experts_of = [torch.tensor(self.ep.experts_of(r)) for r in range(self.world_size)]

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes files, logs and talks to MLflow."""
        return self.rank == 0

    # ---- batches -------------------------------------------------------------------------
    def rows(self, n: int) -> slice:
        """This rank's rows of a batch of `n` sequences (tensor_split shares, in rank order)."""
        lo = self.rank * (n // self.world_size) + min(self.rank, n % self.world_size)
        return slice(lo, lo + n // self.world_size + (self.rank < n % self.world_size))

    # ---- reductions ----------------------------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks, in place; returns `tensor`."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        """Maximum over ranks, in place; returns `tensor`."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum over ranks of each value (one float64 all-reduce)."""
        return self.sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff `flag` is True on every rank."""
        return int(self.sum(torch.tensor([int(not flag)], device=self.device))) == 0

    def all_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (pickled; small objects only)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ---- gradients -----------------------------------------------------------------------
    @staticmethod
    def _split(model: MoETransformer) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(replicated, expert) parameters, each in `model.parameters()` order."""
        experts = {id(p) for layer in model.moe_layers for p in layer.experts.parameters()}
        params = list(model.parameters())
        return ([p for p in params if id(p) not in experts],
                [p for p in params if id(p) in experts])

    @torch.no_grad()
    def sync_grads(self, model: MoETransformer) -> None:
        """Average the replicated gradients over ranks (one flat all-reduce) and divide the
        expert gradients by W (see the module docstring)."""
        replicated, experts = self._split(model)
        for p in replicated + experts:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        self.sum(flat).div_(self.world_size)
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated]), strict=True):
            p.grad.copy_(g.view_as(p))
        for p in experts:
            p.grad.div_(self.world_size)

    @torch.no_grad()
    def clip_grad_norm(self, model: MoETransformer, max_norm: float) -> Tensor:
        """Clip every gradient by max_norm / (global norm + 1e-6) when that is below 1 (as
        `torch.nn.utils.clip_grad_norm_`) and return the global norm: replicated gradients
        counted once, expert shards summed over ranks."""
        replicated, experts = self._split(model)
        norm_sq = torch.stack([torch.linalg.vector_norm(p.grad) ** 2 for p in replicated]).sum()
        expert_sq = torch.stack([torch.linalg.vector_norm(p.grad) ** 2 for p in experts]).sum()
        total = (norm_sq + self.sum(expert_sq)).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in replicated + experts:
            p.grad.mul_(coef)
        return total

    # ---- checkpoints ---------------------------------------------------------------------
    def _gather_experts(self, local: Tensor) -> Tensor:
        """[E_local, ...] shards of all ranks -> the full [E, ...] tensor, in expert order."""
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        full = local.new_empty((self.ep.layout.num_experts, *local.shape[1:]))
        for ids, part in zip(self.experts_of, parts, strict=True):
            full[ids.to(full.device)] = part
        return full

    def _shard(self, full: Tensor) -> Tensor:
        return full[self.experts_of[self.rank].to(full.device)].clone()

    @staticmethod
    def _expert_keys(model: MoETransformer) -> set[str]:
        experts = {id(p) for layer in model.moe_layers for p in layer.experts.parameters()}
        return {name for name, p in model.named_parameters() if id(p) in experts}

    @staticmethod
    def _expert_slots(model: MoETransformer, optimizer: torch.optim.Optimizer) -> set[int]:
        """Indices (in optimizer.state_dict() numbering) of the expert parameters."""
        experts = {id(p) for layer in model.moe_layers for p in layer.experts.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i for i, p in enumerate(params) if id(p) in experts}

    def full_state(self, model: MoETransformer, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model and optimizer state dicts in the single-process format (collective)."""
        keys = self._expert_keys(model)
        model_sd = {k: self._gather_experts(v) if k in keys else v
                    for k, v in model.state_dict().items()}
        optim_sd = optimizer.state_dict()
        slots = self._expert_slots(model, optimizer)
        optim_sd["state"] = {
            i: {k: self._gather_experts(v) if i in slots and k != "step" else v
                for k, v in st.items()}
            for i, st in optim_sd["state"].items()
        }
        return model_sd, optim_sd

    def load_full_state(self, model: MoETransformer, optimizer: torch.optim.Optimizer,
                        model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        """Load single-process-format states, keeping this rank's expert shards."""
        keys = self._expert_keys(model)
        model.load_state_dict({k: self._shard(v) if k in keys else v
                               for k, v in model_sd.items()})
        slots = self._expert_slots(model, optimizer)
        optimizer.load_state_dict({
            **optim_sd,
            "state": {i: {k: self._shard(v) if i in slots and k != "step" else v
                          for k, v in st.items()}
                      for i, st in optim_sd["state"].items()},
        })


@contextmanager
def process_group(cfg: RunConfig, launch: ProcessLaunch, device: torch.device
                  ) -> Iterator[Parallel]:
    """Join the launcher's process group (NCCL on CUDA, gloo on CPU) for the duration."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.launcher == "torchrun":
        dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                world_size=launch.world_size)
    else:
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                              is_master=launch.rank == 0)
        dist.init_process_group(backend, store=store, rank=launch.rank,
                                world_size=launch.world_size)
    try:
        yield Parallel(cfg, launch, device)
    finally:
        dist.destroy_process_group()


@dataclass
class A2AMeter:
    """All-to-all of one optimizer step, measured and predicted (see the module docstring).

    `add(...)` after each micro-batch's forward; `record(par)` (collective) returns the
    step's {"measured": ..., "predicted": ...} for timing.jsonl and resets."""

    cfg: RunConfig
    experts: list[Tensor] = field(default_factory=list)
    stats: list[A2AStats] = field(default_factory=list)
    timers: list[PhaseTimer] = field(default_factory=list)

    def add(self, experts_TK: Iterable[Tensor], keeps_TK: Iterable[Tensor],
            stats: Iterable[A2AStats | None], timer: PhaseTimer | None, rank: int,
            first_expert: int) -> None:
        """One micro-batch's layers: routing (dropped assignments moved to `first_expert`,
        this rank's first expert, so the prediction counts them as staying home), the
        layers' all-to-all statistics and the micro-batch's phase timer."""
        for experts, keep, st in zip(experts_TK, keeps_TK, stats, strict=True):
            if st is None:
                raise ValueError(f"rank {rank}: a MoE layer ran without expert parallelism")
            self.experts.append(torch.where(keep, experts, first_expert).cpu())
            self.stats.append(st)
        if timer is not None:
            self.timers.append(timer)

    def record(self, par: Parallel) -> dict[str, Any]:
        phases = ("permute", "counts", *PHASES, "experts", "unpermute")
        seconds = torch.zeros(len(phases), dtype=torch.float64, device=par.device)
        for timer in self.timers:
            timed = timer.seconds()
            for i, phase in enumerate(phases):
                seconds[i] += timed.get(phase, 0.0)
        # phase, link, useful bytes | rows | bytes moved (padding included), summed on the host
        sent = torch.zeros(2, 2, 3, dtype=torch.int64)
        for st in self.stats:
            counted = (st.link_bytes, st.link_rows, st.moved_link_bytes)
            for i, phase in enumerate(PHASES):
                for j, link in enumerate(LINKS):
                    for k, per_link in enumerate(counted):
                        sent[i, j, k] += per_link[phase][link]
        sent = sent.to(par.device)
        par.max(seconds)
        par.sum(sent)
        predicted = self._predict(par)
        record = {
            "measured": {
                "seconds": dict(zip(phases, seconds.tolist(), strict=True)),
                "bytes": {p: {link: int(sent[i, j, 0]) for j, link in enumerate(LINKS)}
                          for i, p in enumerate(PHASES)},
                "copies": {p: {link: int(sent[i, j, 1]) for j, link in enumerate(LINKS)}
                           for i, p in enumerate(PHASES)},
                "moved_bytes": {p: {link: int(sent[i, j, 2]) for j, link in enumerate(LINKS)}
                                for i, p in enumerate(PHASES)},
            },
            "predicted": predicted,
            "elem_bytes": {p: self.stats[0].row_bytes // self.cfg.model.d_model for p in PHASES},
            "world_size": par.world_size,
        }
        self.experts.clear()
        self.stats.clear()
        self.timers.clear()
        return record

    def _predict(self, par: Parallel) -> dict[str, Any]:
        """`moebench.comm` accounting of every (micro-batch, layer) routing of all ranks, on
        the real ranks' layout (what really crossed a link)."""
        sizes = [len(e) for e in self.experts]
        local = torch.cat(self.experts).to(par.device)
        parts = [torch.empty_like(local) for _ in range(par.world_size)]
        dist.all_gather(parts, local, group=par.group)
        per_rank = [p.cpu().split(sizes) for p in parts]
        elem = self.stats[0].row_bytes // self.cfg.model.d_model
        topo = Topology(par.ep.rank_layout, hidden=self.cfg.model.d_model,
                        dispatch_bytes=elem, combine_bytes=elem)
        copies = {link: 0 for link in LINKS}
        modeled_us = dict.fromkeys(PHASES, 0.0)
        dispatcher = par.ep.dispatcher
        for i in range(len(sizes)):
            tr = traffic(torch.cat([rank[i] for rank in per_rank]), topo, threads=1)
            for link, n in tr.token_stats(topo).copies[dispatcher].items():
                copies[link] += n
            row = next(r for r in summarize(tr.token_stats(topo), topo, tr)
                       if r["dispatcher"] == dispatcher)
            for phase in PHASES:
                modeled_us[phase] += row[f"a2a_{phase}_us"]
        return {
            "bytes": {p: {link: round(copies[link] * topo.bytes_per_copy(p)) for link in LINKS}
                      for p in PHASES},
            "copies": {p: dict(copies) for p in PHASES},
            "modeled_us": modeled_us,
        }
