"""The training loop of `moebench train`: one run of one strategy, resumable, deterministic.

Optimisation: AdamW (weight decay on matrices only: every parameter with >= 2 dims, i.e.
embeddings, linear and expert weights; norms are not decayed), linear warmup then cosine
decay to `min_lr_frac * lr`, gradient clipping by global norm, gradient accumulation over
`grad_accum` micro-batches; bf16 autocast on CUDA, float32 on CPU. The aux-loss-free bias is
updated exactly once per optimizer step from the loads of all its micro-batches ([V3]
§2.1.2), with rate 0 from step floor(freeze_frac * steps) on, and is frozen in evaluation.

Outputs (run directory contract: docs/run-directory.md), every file through `moebench.io`:
- config.resolved.yaml; summary.json; routing_trace.parquet (written at the end). On a
  corpus with domains (data.source = mixed) summary.json adds `load_by_domain`: for each
  domain, the final evaluation's per-layer, per-expert loads [L][E] of its windows (they
  sum to `load_global`), for domain-specialisation analyses ([V3] Fig. 9).
- metrics.jsonl: deterministic records only ({"kind": "train", ...} every log_every steps
  and at the last step, {"kind": "eval", ...} every eval_every steps and at the end). The
  wall-clock fields (tokens_per_s, mfu, elapsed_s) go to timing.jsonl instead, so the same
  config and seed give a byte-identical metrics.jsonl (bitwise on CPU). summary.json keeps
  the run's mean tokens_per_s, mfu and elapsed_s; `TIMING_KEYS` names them, the only
  summary fields that differ between identical runs.
- Both .jsonl files are appended live (one flushed line per record) and rewritten
  atomically from the checkpoint on resume and once at the end, so the final files are
  complete and a killed-and-resumed run ends with the same bytes as an uninterrupted one.

Distributed runs (torchrun, srun; `moebench.train.distributed` says how the batch, the
gradients, the experts and the checkpoints are split) give the same files, written by rank
0: every metric is reduced over the global batch (loads, drops and the bias counts summed,
losses averaged over ranks), and each timing.jsonl record adds `a2a`: the logged step's
measured all-to-all beside the `moebench.comm` accounting's prediction; summary.json adds
`world_size`. MFU divides by the peak of all W GPUs.

Metrics: `load` is the per-layer, per-expert count of the routing performed (before
capacity dropping) summed over the step's micro-batches; `maxvio_batch` the mean over
layers of its MaxVio ([LF] eq. 4); `drop_frac` the fraction of assignments dropped by
capacity (`a2a_drop_frac`, under `topology.a2a_capacity_factor` only: by the padded
all-to-all's fixed capacity, docs/metrics.md §4.1); `aux` the alpha-weighted auxiliary
losses summed over layers (mean over micro-batches); `loss` = ce_loss + sum(aux). A
dense model (no MoE layer: the dense baseline) trains the same way; its MaxVio and drop
fractions are null, its loads and routing trace empty. The global loss's running count is
reset at the start of every optimizer step (docs/global_loss.md). MFU = (6 * active
params + 12 * layers * d_model * seq_len) * tokens/s / peak bf16 FLOP/s (nanoGPT/PaLM
accounting: embedding lookup excluded, attention counted non-causally; active params count
top_k of E routed experts); peak is the dense bf16 tensor-core rate of the GPU
(H100/H200/H800 SXM 989e12, A100 312e12); unknown GPUs and CPUs give null.

Legend: L MoE layers, E routed experts, K experts per token, B batch, S sequence length.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from moebench.balancing import BiasController, all_reduce_sum
from moebench.comm.alltoall import PhaseTimer
from moebench.config import RunConfig
from moebench.data import TokenStream
from moebench.io import (
    check_writable_dir,
    disk_full_message,
    remove_temporaries,
    write_json,
    write_text,
    write_yaml,
    writer_lock,
)
from moebench.metrics import expert_load, max_vio, max_vio_layers
from moebench.model import MoETransformer
from moebench.progress import eta, progress
from moebench.report import paths
from moebench.train.checkpoint import (
    CKPT_NAME,
    identity,
    load_checkpoint,
    matches,
    save_checkpoint,
)
from moebench.train.distributed import A2AMeter, Parallel, ProcessLaunch, check_world, process_group
from moebench.train.memory import check_memory
from moebench.train.trace import write_trace
from moebench.train.tracking import ARTIFACTS, step_metrics, summary_metrics

logger = logging.getLogger(__name__)

TIMING_KEYS = ("elapsed_s", "mfu", "tokens_per_s")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


class TrainingDivergedError(RuntimeError):
    """NaN/inf router logits or loss: names the step, the MoE layer (if a router) and the
    last good checkpoint, which is left untouched."""

    def __init__(self, step: int, layer: int | None, checkpoint: str) -> None:
        what = (f"router logits of MoE layer {layer} contain NaN or inf" if layer is not None
                else "the loss is NaN or inf (router logits finite)")
        super().__init__(f"training diverged at step {step}: {what}; "
                         f"last good checkpoint: {checkpoint}")
        self.step = step
        self.layer = layer


def resolve_device(cfg: RunConfig) -> torch.device:
    """train.device: "auto" = CUDA when available, else CPU."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; "
                         "allowed here: 'auto', 'cpu'")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def machine_label(device: torch.device) -> str:
    """Hardware name, independent of the host name: the GPU's, or "cpu-<model>"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu-{line.split(':', 1)[1].strip()}"
    return f"cpu-{platform.processor() or platform.machine()}"


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (see the module docstring), None if unknown or CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def git_sha() -> str:
    """HEAD of the repository holding this file, "unknown" outside git or before a commit."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def lr_at(step: int, cfg: RunConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps,
    then cosine from lr to min_lr_frac * lr at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(t.steps - 1 - t.warmup_steps, 1)
    progress = min((step - t.warmup_steps) / span, 1.0)
    floor = t.min_lr_frac * t.lr
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_ckpt_dir(cfg: RunConfig) -> Path:
    """<output root>/ckpt/<study>/<dataset>/<strategy>/seed~<n> (the run's sub-path)."""
    from moebench.report.paths import ckpt_dir

    return ckpt_dir(cfg.study, cfg.dataset, cfg.strategy, cfg.seed)


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Run:
    """Validated inputs of one run (`prepare`); nothing has been written yet."""

    cfg: RunConfig
    out: Path
    ckpt_dir: Path
    device: torch.device
    train_data: TokenStream
    val_data: TokenStream
    checkpoint: dict[str, Any] | None
    parallel: Parallel | None = None


MAX_EPOCHS = 4.0
"""Passes over the training tokens above which a run warns: up to about 4 epochs, repeated
tokens train almost as well as new ones (Muennighoff et al. 2023, arXiv 2305.16264, Fig. 3)."""


def epochs_warning(cfg: RunConfig, n_train_tokens: int) -> str | None:
    """A warning when the run sees its training tokens more than MAX_EPOCHS times, else None."""
    t = cfg.train
    seen = t.steps * t.grad_accum * t.batch_size * t.seq_len
    epochs = seen / max(1, n_train_tokens)
    if epochs <= MAX_EPOCHS:
        return None
    return (
        f"train.steps={t.steps} x {seen // t.steps} tokens per step is {epochs:.1f} epochs of "
        f"the {n_train_tokens} training tokens in {cfg.data_dir}: expect overfitting (validation "
        f"loss far above training loss); use more data or fewer steps (<= {MAX_EPOCHS:g} epochs)"
    )


def prepare(cfg: RunConfig, out: Path, ckpt_dir: Path | None = None,
            parallel: Parallel | None = None) -> Run:
    """Check everything a run needs (device, data, tracking store, checkpoint) and write
    nothing; ValueError naming the problem otherwise. `parallel`: this rank of a distributed
    run (its device is used; only rank 0 checks the tracking store)."""
    out, ckpt_dir = Path(out), Path(ckpt_dir) if ckpt_dir is not None else default_ckpt_dir(cfg)
    check_writable_dir(out, "--out")
    check_writable_dir(ckpt_dir, "--ckpt-dir")
    device = resolve_device(cfg) if parallel is None else parallel.device
    check_memory(cfg, device, 1 if parallel is None else parallel.world_size)
    streams = [TokenStream(cfg.data_dir, split, vocab_size=cfg.data.vocab_size, config=cfg.data,
                           verify=True)  # SHA-256: a damaged file is refused, not trained on
               for split in ("train", "val")]
    for stream in streams:
        if len(stream) < cfg.train.seq_len + 1:
            raise ValueError(
                f"train.seq_len={cfg.train.seq_len} needs {cfg.train.seq_len + 1} tokens; split "
                f"{stream.split!r} of {cfg.data_dir} has {len(stream)}"
            )
    if (warning := epochs_warning(cfg, len(streams[0]))) and (parallel is None or parallel.lead):
        logger.warning(warning)
    if cfg.tracking.uri is not None and (parallel is None or parallel.lead):
        from moebench.train.tracking import check_uri

        check_uri(cfg.tracking.uri, cfg.tracking.parent_run_id)
    state = load_checkpoint(ckpt_dir)
    if state is not None and not matches(state, cfg):
        theirs, ours = state.get("identity", {}), identity(cfg)
        differ = sorted(k for k in ours if theirs.get(k) != ours[k])
        logger.info(f"ignoring checkpoint {ckpt_dir / CKPT_NAME}: written by another config "
                    f"(sections differ: {', '.join(differ)}); starting from step 0")
        state = None
    return Run(cfg, out, ckpt_dir, device, streams[0], streams[1], state, parallel)


@contextlib.contextmanager
def _torch_settings(threads: int, deterministic: bool) -> Iterator[None]:
    """Thread count and deterministic algorithms for the run; restored afterwards."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


class Trainer:
    """One run: model, optimizer, bias controller, data order and bookkeeping.

    `train_step()` does one optimizer step; `run()` the whole run (resume, loop, final
    evaluation, trace, summary). Construct it inside `run()`'s settings, or through `train`.
    """

    def __init__(self, run: Run) -> None:
        self.run_spec = run
        self.cfg = cfg = run.cfg
        self.device = run.device
        self.out = run.out
        self.par = run.parallel
        self.lead = self.par is None or self.par.lead
        self.world_size = 1 if self.par is None else self.par.world_size
        torch.manual_seed(cfg.seed)
        model_cfg = cfg.transformer_config(run.train_data.vocab_size)
        self.model = MoETransformer(model_cfg).to(self.device)
        if cfg.train.compile and self.device.type == "cuda":
            self.model.compile_dense()
        total, active = self.model.param_counts()  # the whole model, before any sharding
        if self.par is not None:
            self.model.shard_experts(self.par.ep)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), fused=self.device.type == "cuda",
        )
        b = cfg.balance.bias
        freeze = math.floor(b.freeze_frac * t.steps) if b.freeze_frac < 1.0 else None
        self.bias = (BiasController(self.model.num_moe_layers, cfg.router.num_experts, b.rate,
                                    b.rule, freeze, b.recenter, device=self.device)
                     if b.enabled else None)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.params_total, self.params_active = total, active
        m = cfg.model
        self.flops_per_token = 6 * active + 12 * m.n_layers * m.d_model * t.seq_len
        peak = peak_flops(self.device)
        self.peak = peak * self.world_size if peak is not None else None  # all ranks' GPUs
        self.a2a = A2AMeter(cfg) if self.par is not None else None
        self._a2a_record: dict[str, Any] | None = None
        self.step = 0
        self.metrics_lines: list[str] = []
        self.timing_lines: list[str] = []
        self.sums = {"maxvio_batch": 0.0, "drop_frac": 0.0, "tokens": 0, "train_s": 0.0,
                     "elapsed_s": 0.0}
        self.mlflow_run_id: str | None = None
        self._last_eval: dict[str, Any] = {}  # the last evaluation record (for MLflow)
        self.last_ckpt = "none"
        self._window = {"tokens": 0, "seconds": 0.0}
        self._files: dict[str, IO[str]] = {}
        if run.checkpoint is not None:
            self._restore(run.checkpoint)
        if self.par is not None and len(set(self.par.all_objects(self.step))) > 1:
            raise ValueError(f"the ranks found different checkpoints in --ckpt-dir="
                             f"{run.ckpt_dir}; allowed: one directory shared by all ranks")

    def _log(self, msg: str) -> None:
        if self.lead:
            logger.info(msg)

    # ---- state -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Everything to resume; under expert parallelism gathered into the single-process
        format (collective)."""
        if self.par is None:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        else:
            model, optimizer = self.par.full_state(self.model, self.optimizer)
        return {
            "identity": identity(self.cfg),
            "step": self.step,
            "model": model,
            "optimizer": optimizer,
            "bias": self.bias.state_dict() if self.bias is not None else None,
            "batch_rng": self.batch_generator.get_state(),
            "drop_rng": self.model.drop_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "metrics_lines": list(self.metrics_lines),
            "timing_lines": list(self.timing_lines),
            "sums": dict(self.sums),
            "mlflow_run_id": self.mlflow_run_id,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if self.par is None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.par.load_full_state(self.model, self.optimizer, state["model"],
                                     state["optimizer"])
        if self.bias is not None:
            self.bias.load_state_dict(state["bias"])
        self.batch_generator.set_state(state["batch_rng"])
        self.model.drop_generator.set_state(state["drop_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.metrics_lines = list(state["metrics_lines"])
        self.timing_lines = list(state["timing_lines"])
        self.sums = dict(state["sums"])
        self.mlflow_run_id = state["mlflow_run_id"]
        self.last_ckpt = f"step {self.step} in {self.run_spec.ckpt_dir / CKPT_NAME}"
        self._log(f"resuming from {self.last_ckpt}")

    def save(self) -> None:
        """Checkpoint the current step (rank 0 writes; every rank takes part)."""
        state = self._state()
        path = self.run_spec.ckpt_dir / CKPT_NAME
        if self.lead:
            path = save_checkpoint(self.run_spec.ckpt_dir, state)
        self.last_ckpt = f"step {self.step} in {path}"

    # ---- files -------------------------------------------------------------------------
    def _rewrite_logs(self) -> None:
        """Atomically rewrite both .jsonl files from memory, then reopen them for appends
        (rank 0 only)."""
        self._close_logs()
        if not self.lead:
            return
        for name, lines in (("metrics.jsonl", self.metrics_lines),
                            ("timing.jsonl", self.timing_lines)):
            write_text(self.out / name, "".join(lines))
            self._files[name] = (self.out / name).open("a")

    def _close_logs(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _append(self, name: str, record: dict[str, Any]) -> None:
        line = _dumps(record)
        (self.metrics_lines if name == "metrics.jsonl" else self.timing_lines).append(line)
        if self.lead:
            f = self._files[name]
            with disk_full_message(self.out / name, "a rerun resumes from the last checkpoint"):
                f.write(line)
                f.flush()

    # ---- steps -------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor,
                 timer: PhaseTimer | None = None) -> Any:
        bias_LE = self.bias.bias_LE if self.bias is not None else None
        with self._autocast():
            return self.model(tokens_BS.to(self.device, non_blocking=True),
                              targets_BS.to(self.device, non_blocking=True), bias_LE, timer)

    @staticmethod
    def _bad(out: Any) -> torch.Tensor:
        """int [L + 1] on the device: 1 where a MoE layer's router logits or (last) the loss
        were not finite; read later, so the forward needs no host sync."""
        flags = [~r.finite for r in out.layers]
        if out.ce_loss is not None:
            flags.append(~torch.isfinite(out.loss))
        else:
            flags.append(torch.zeros((), dtype=torch.bool, device=out.logits.device))
        return torch.stack(flags).int()

    def _check_finite(self, bad_L: torch.Tensor, step: int) -> None:
        """TrainingDivergedError naming the first non-finite router (or the loss) of any
        rank (one host sync; collective under expert parallelism)."""
        if self.par is not None:
            self.par.sum(bad_L)
        bad = bad_L.tolist()
        if any(bad):
            first = bad.index(next(b for b in bad if b))
            raise TrainingDivergedError(step, first if first < len(bad) - 1 else None,
                                        self.last_ckpt)

    def _rows(self, *batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's sequences of a batch (all of them in a single process)."""
        if self.par is None:
            return batch
        rows = self.par.rows(len(batch[0]))
        return tuple(t[rows] for t in batch)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns its train record."""
        cfg, t = self.cfg, self.cfg.train
        step = self.step + 1
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        L, E = self.model.num_moe_layers, cfg.router.num_experts
        for layer in self.model.moe_layers:  # the global loss counts this step's batch only
            layer.reset_global_counts()
        load_LE = torch.zeros(L, E, dtype=torch.int64, device=self.device)
        dropped_2 = torch.zeros(2, dtype=torch.int64, device=self.device)  # capacity, a2a
        ce = torch.zeros((), device=self.device)
        aux: dict[str, torch.Tensor] = {}
        bad_L = torch.zeros(L + 1, dtype=torch.int32, device=self.device)
        meter = self.a2a if step % t.log_every == 0 or step == t.steps else None
        for _ in range(t.grad_accum):
            tokens_BS, targets_BS = self._rows(*self.run_spec.train_data.batch(
                self.batch_generator, t.batch_size, t.seq_len))
            timer = PhaseTimer(self.device) if meter is not None else None
            out = self._forward(tokens_BS, targets_BS, timer)
            bad_L += self._bad(out)
            if meter is not None and self.par is not None:
                meter.add((r.experts_TK for r in out.layers), (r.keep_TK for r in out.layers),
                          (r.comm for r in out.layers), timer, self.par.rank,
                          self.par.ep.local_experts[0])
            (out.loss / t.grad_accum).backward()
            ce += out.ce_loss.detach() / t.grad_accum
            for name, value in out.aux.items():
                aux[name] = aux.get(name, 0.0) + value.detach() / t.grad_accum
            for i, routing in enumerate(out.layers):
                load_LE[i] += expert_load(routing.experts_TK, E)
                dropped_2[0] += (~routing.keep_TK).sum()
                if routing.comm is not None and routing.comm.dropped is not None:
                    dropped_2[1] += routing.comm.dropped
                if self.bias is not None:
                    self.bias.observe(i, routing.experts_TK, routing.keep_TK, training=True)
        self._check_finite(bad_L, step)
        if self.par is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            self.par.sync_grads(self.model)
            grad_norm = self.par.clip_grad_norm(self.model, t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bias is not None:
            self.bias.step(self.step, None if self.par is None else all_reduce_sum(self.par.group))
        self.step = step
        names = sorted(aux)
        ce_f, *aux_fs = [float(ce), *(float(aux[n]) for n in names)]
        if self.par is not None:  # the global batch's loads, drops and mean losses
            self.par.sum(load_LE)
            self.par.sum(dropped_2)
            ce_f, *aux_fs = (x / self.world_size for x in self.par.sum_floats([ce_f, *aux_fs]))
            if meter is not None:
                self._a2a_record = meter.record(self.par)
        aux_f = dict(zip(names, aux_fs, strict=True))
        load = load_LE.cpu()
        layers = [max_vio(load_E) for load_E in load]
        assignments = t.grad_accum * t.batch_size * t.seq_len * cfg.router.top_k * L
        dropped, a2a_dropped = dropped_2.tolist()
        record = {
            "kind": "train", "step": step, "lr": lr, "ce_loss": ce_f,
            "loss": ce_f + sum(aux_f.values()), "aux": aux_f,
            "maxvio_batch": sum(layers) / L if L else None, "maxvio_batch_layers": layers,
            "load": load.tolist(), "drop_frac": dropped / assignments if L else None,
            "grad_norm": float(grad_norm),
        }
        if self.par is not None and self.par.ep.a2a_capacity_factor is not None and L:
            record["a2a_drop_frac"] = a2a_dropped / assignments
        if L:  # a dense model (no MoE layer) has no load: its MaxVio and drops are null
            self.sums["maxvio_batch"] += record["maxvio_batch"]
            self.sums["drop_frac"] += record["drop_frac"]
        self.sums["tokens"] += t.grad_accum * t.batch_size * t.seq_len
        return record

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, Any], torch.Tensor]:
        """Validation loss/perplexity/bits per byte on the first eval_batches x batch_size
        windows of the val split, and their per-layer loads split by the windows' domain
        range, int64 [D, L, E] (D = 1 without domains; summed over D: MaxVio_global)."""
        t = self.cfg.train
        self.model.eval()
        L, E, K = self.model.num_moe_layers, self.cfg.router.num_experts, self.cfg.router.top_k
        val = self.run_spec.val_data
        domain_W = torch.from_numpy(val.eval_domains(t.seq_len))
        D = max(len(val.domains), 1)
        load_DLE = torch.zeros(D, L, E, dtype=torch.int64, device=self.device)
        nll, n = 0.0, 0
        for b, batch in enumerate(val.iter_eval(t.batch_size, t.seq_len, t.eval_batches)):
            domain_B = domain_W[b * t.batch_size : (b + 1) * t.batch_size]
            tokens_BS, targets_BS, domain_B = self._rows(*batch, domain_B)
            out = self._forward(tokens_BS, targets_BS)
            self._check_finite(self._bad(out), self.step)
            if targets_BS.numel():
                nll += float(out.ce_loss) * targets_BS.numel()
                n += targets_BS.numel()
            slot_B = domain_B.to(self.device)[:, None, None] * E  # domain-major bincount slots
            for i, routing in enumerate(out.layers):
                experts_BSK = routing.experts_TK.view(*tokens_BS.shape, K)
                slots_TK = (slot_B + experts_BSK).reshape(-1, K)  # domain d, expert e: d E + e
                load_DLE[:, i] += expert_load(slots_TK, D * E).view(D, E)
        self.model.train()
        if self.par is not None:
            nll, n = self.par.sum_floats([nll, n])
            self.par.sum(load_DLE)
        val_loss = nll / n
        load_DLE = load_DLE.cpu()
        load = load_DLE.sum(dim=0)
        record = {
            "kind": "eval", "step": self.step, "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf,
            "val_bpb": val.bits_per_byte(val_loss),
            "maxvio_global": max_vio_layers(load) if L else None,
        }
        return record, load_DLE

    @torch.no_grad()
    def routing_trace(self) -> tuple[torch.Tensor, torch.Tensor]:
        """experts and gates [L, T, K] of the first trace_tokens val tokens (eval mode)."""
        t = self.cfg.train
        self.model.eval()
        n_windows = min(math.ceil(t.trace_tokens / t.seq_len),
                        self.run_spec.val_data.num_windows(t.seq_len))
        experts: list[list[torch.Tensor]] = [[] for _ in range(self.model.num_moe_layers)]
        weights: list[list[torch.Tensor]] = [[] for _ in range(self.model.num_moe_layers)]
        batches = self.run_spec.val_data.iter_eval(
            t.batch_size, t.seq_len, math.ceil(n_windows / t.batch_size))
        for batch in batches:
            out = self._forward(*self._rows(*batch))
            self._check_finite(self._bad(out), self.step)
            for i, routing in enumerate(out.layers):
                experts[i].append(routing.experts_TK.cpu())
                weights[i].append(routing.weights_TK.float().cpu())
        self.model.train()
        if self.par is not None:  # every rank's share of each batch, in rank order
            ranks = self.par.all_objects((experts, weights))
            experts, weights = ([[torch.cat([r[k][i][b] for r in ranks])
                                  for b in range(len(experts[i]))]
                                 for i in range(len(experts))] for k in (0, 1))
        n_tokens = min(t.trace_tokens, n_windows * t.seq_len)
        if not experts:  # a dense model: an empty trace (no MoE layer)
            empty_LTK = torch.zeros(0, n_tokens, self.cfg.router.top_k)
            return empty_LTK.long(), empty_LTK
        return (torch.stack([torch.cat(e)[:n_tokens] for e in experts]),
                torch.stack([torch.cat(w)[:n_tokens] for w in weights]))

    # ---- run ---------------------------------------------------------------------------
    def _timing(self, step: int) -> dict[str, Any]:
        w = self._window
        tps = w["tokens"] / w["seconds"] if w["seconds"] > 0 else None
        mfu = (self.flops_per_token * tps / self.peak
               if tps is not None and self.peak is not None else None)
        self._window = {"tokens": 0, "seconds": 0.0}
        record = {"step": step, "tokens_per_s": tps, "mfu": mfu,
                  "elapsed_s": self.sums["elapsed_s"]}
        if self._a2a_record is not None:
            record["a2a"], self._a2a_record = self._a2a_record, None
        return record

    def _bias_metrics(self) -> dict[str, Any]:
        """The aux-loss-free bias per MoE layer for MLflow (not the files, whose bytes stay
        fixed): its L2 norm and its spread (max - min), the layers' mean beside them."""
        if self.bias is None:
            return {}
        bias_LE = self.bias.bias_LE.detach().float().cpu()
        norm_L = bias_LE.norm(dim=1)
        spread_L = bias_LE.max(dim=1).values - bias_LE.min(dim=1).values
        return {"bias_norm": norm_L.mean().item(), "bias_spread": spread_L.mean().item(),
                "bias_norm_layers": norm_L.tolist(), "bias_spread_layers": spread_L.tolist()}

    def _log_eval(self, tracker: Any) -> tuple[dict[str, Any], torch.Tensor]:
        record, load = self.evaluate()
        self._last_eval = record
        self._append("metrics.jsonl", record)
        if tracker is not None:
            tracker.log_metrics(step_metrics(record), self.step)
        bpb, vio = record["val_bpb"], record["maxvio_global"]
        self._log(f"eval step {self.step}: val_loss {record['val_loss']:.4f} "
            f"ppl {record['val_ppl']:.2f}" + (f" bpb {bpb:.4f}" if bpb is not None else "")
            + (f" maxvio_global {vio:.3f}" if vio is not None else ""))
        return record, load

    def run(self) -> dict[str, Any]:
        """Train from the current step to train.steps, then evaluate, trace and summarise."""
        cfg = self.cfg
        tracker = None
        if cfg.tracking.uri is not None and self.lead:
            from moebench.train.tracking import Tracker

            resumed = self.mlflow_run_id is not None
            tracker = Tracker(cfg, self.mlflow_run_id)
            self.mlflow_run_id = tracker.run_id
            tracker.start_system_metrics(resumed)
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.out, paths.RUN_FILES)  # cut short by a killed attempt
            # an earlier run's files never stand beside this run's: the completion markers
            # go first, and the directory is incomplete until this run ends
            for name in ("summary.json", "comm.json", *paths.RUN_FILES):
                (self.out / name).unlink(missing_ok=True)
            write_yaml(self.out / "config.resolved.yaml", cfg.model_dump(mode="json"))
        self._rewrite_logs()
        try:
            summary = self._loop(tracker)
        except BaseException:
            self._close_logs()
            if tracker is not None:
                tracker.finish("FAILED")
            raise
        if tracker is not None:
            tracker.log_metrics(summary_metrics(summary, self._last_eval), self.step)
            tracker.log_artifacts(self.out / name for name in ARTIFACTS)
            tracker.finish()
        return summary

    def _loop(self, tracker: Any) -> dict[str, Any]:
        """The training steps (a progress bar with ETA on a terminal), then the summary."""
        with progress(f"{self.cfg.strategy}/seed~{self.cfg.seed}", "step",
                      total=self.cfg.train.steps, initial=self.step, show=self.lead,
                      lines=False) as bar:  # its own lines: every log_every steps
            self._steps(tracker, bar)
        return self._finish(tracker)

    def _steps(self, tracker: Any, bar: tqdm) -> None:
        """Optimizer steps up to train.steps: records, evaluations and checkpoints on schedule."""
        t = self.cfg.train
        tokens_per_step = t.grad_accum * t.batch_size * t.seq_len
        started, first_step = time.perf_counter(), self.step
        elapsed_before = self.sums["elapsed_s"]
        while self.step < t.steps:
            tic = time.perf_counter()
            record = self.train_step()
            dt = time.perf_counter() - tic
            self.sums["train_s"] += dt
            self.sums["elapsed_s"] = elapsed_before + time.perf_counter() - started
            self._window["tokens"] += tokens_per_step
            self._window["seconds"] += dt
            step = self.step
            if step % t.log_every == 0 or step == t.steps:
                timing = self._timing(step)
                self._append("metrics.jsonl", record)
                self._append("timing.jsonl", timing)
                if tracker is not None:
                    tracker.log_metrics(step_metrics(record, timing) | self._bias_metrics(),
                                        step)
                tps, vio = timing["tokens_per_s"], record["maxvio_batch"]
                left = eta(time.perf_counter() - started, step - first_step, t.steps - step)
                self._log(f"step {step}/{t.steps} loss {record['loss']:.4f} "
                    + (f"maxvio {vio:.3f} " if vio is not None else "") + f"tok/s {tps or 0:.0f}"
                    + (f" mfu {timing['mfu']:.3f}" if timing["mfu"] is not None else "")
                    + f" eta {left}")
            if step % t.eval_every == 0 and step < t.steps:
                self._log_eval(tracker)
            if step % t.ckpt_every == 0 or step == t.steps:
                self.save()
            bar.update()

    def _finish(self, tracker: Any) -> dict[str, Any]:
        """The final evaluation, the routing trace and the summary."""
        cfg, t = self.cfg, self.cfg.train
        eval_record, load_DLE = self._log_eval(tracker)
        load_global = load_DLE.sum(dim=0)
        self._close_logs()
        self._rewrite_logs()
        self._close_logs()
        experts_LTK, weights_LTK = self.routing_trace()
        if self.lead:
            write_trace(self.out / "routing_trace.parquet", experts_LTK, weights_LTK, cfg,
                        t.seq_len)
        train_s = self.sums["train_s"]
        tps = self.sums["tokens"] / train_s if train_s > 0 else None
        moe = self.model.num_moe_layers > 0
        summary = {
            "study": cfg.study, "dataset": cfg.dataset, "strategy": cfg.strategy,
            "seed": cfg.seed, "steps": t.steps,
            "val_loss": eval_record["val_loss"], "val_ppl": eval_record["val_ppl"],
            "val_bpb": eval_record["val_bpb"],
            "maxvio_global": eval_record["maxvio_global"],
            "maxvio_global_layers": [max_vio(load_E) for load_E in load_global],
            "maxvio_batch_mean": self.sums["maxvio_batch"] / t.steps if moe else None,
            "drop_frac": self.sums["drop_frac"] / t.steps if moe else None,
            "load_global": load_global.tolist(),
            "tokens_per_s": tps,
            "mfu": (self.flops_per_token * tps / self.peak
                    if tps is not None and self.peak is not None else None),
            "elapsed_s": self.sums["elapsed_s"],
            "tokens_trained": self.sums["tokens"],
            "params_total": self.params_total, "params_active": self.params_active,
            "machine": machine_label(self.device), "device": self.device.type,
            "git_sha": git_sha(), "torch_version": torch.__version__,
            "world_size": self.world_size,
        }
        if domains := self.run_spec.val_data.domains:  # a mixed corpus: loads per domain
            summary["load_by_domain"] = dict(zip(domains, load_DLE.tolist(), strict=True))
        if self.lead:
            write_json(self.out / "summary.json", summary)
            if not t.keep_ckpt:  # complete: the run directory is all that is needed now
                (self.run_spec.ckpt_dir / CKPT_NAME).unlink(missing_ok=True)
        vio = summary["maxvio_global"]
        self._log(f"done: val_loss {summary['val_loss']:.4f}"
            + (f" maxvio_global {vio:.3f}" if vio is not None else "") + f" -> {self.out}")
        return summary


def train(cfg: RunConfig, out: Path, ckpt_dir: Path | None = None) -> dict[str, Any]:
    """Run `cfg` into the run directory `out` (resuming from `ckpt_dir`'s last checkpoint);
    returns the summary. ValueError before anything is written if an input is unusable;
    TrainingDivergedError on NaN/inf. Started by torchrun or srun with several tasks, this
    process is one rank of a distributed run (`moebench.train.distributed`)."""
    launch = ProcessLaunch.from_env()
    check_world(cfg, launch.world_size)
    if launch.world_size == 1:
        return _train(prepare(cfg, out, ckpt_dir))
    device = resolve_device(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", launch.local_rank)
    with process_group(cfg, launch, device) as par:
        return _train(prepare(cfg, out, ckpt_dir, par))


def _train(run: Run) -> dict[str, Any]:
    lead = run.parallel is None or run.parallel.lead
    with (
        writer_lock(run.out, "--out") if lead else contextlib.nullcontext(),
        torch.random.fork_rng(devices=[]),
        _torch_settings(run.cfg.train.threads, deterministic=run.device.type == "cpu"),
    ):
        return Trainer(run).run()
