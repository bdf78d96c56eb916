"""Where a training step's time goes: `torch.profiler` over a few optimizer steps of
`moebench.train.Trainer` after warm-up, one GPU. Prints the top kernels by GPU time, the top
operators by host time, and the host syncs and launches per step; writes the tables to --out.

    python benchmarks/profile_step.py --model study --data work/data/shakespeare-8k --out $OUT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import run_config

from moebench.config import RunConfig
from moebench.train.loop import Trainer, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="study")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    cfg = RunConfig.model_validate(run_config(args.model, args.data, 1000, args.batch))
    trainer = Trainer(prepare(cfg, Path("/tmp/profile_run"), Path("/tmp/profile_ckpt")))
    for _ in range(20):
        trainer.train_step()
    torch.cuda.synchronize()
    tic = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            trainer.train_step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - tic) / args.steps
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / args.steps / 1e3
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize",
                                                     "cudaDeviceSynchronize")) / args.steps
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC")) / args.steps
    copies = sum(e.count for e in events if e.key == "cudaMemcpyAsync") / args.steps
    head = (f"{args.model} batch {args.batch}: step {wall * 1e3:.1f} ms wall (profiled), GPU "
            f"busy {gpu:.1f} ms; per step: {launches:.0f} launches, {syncs:.0f} syncs, "
            f"{copies:.0f} memcpy")
    by_gpu = events.table(sort_by="self_device_time_total", row_limit=25)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=25)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{args.model}_b{args.batch}.txt").write_text(
        f"{head}\n\n# by GPU time\n{by_gpu}\n\n# by host time\n{by_cpu}\n")
    print(head)
    print(events.table(sort_by="self_device_time_total", row_limit=12))


if __name__ == "__main__":
    main()
