"""Training speed of `moebench train` on the GPUs of one machine, in one call: tokens/s and MFU
of short runs, this checkout's code against a reference checkout's (`--baseline-src`, e.g. the
commit before the speed work, extracted with `git archive`), on one GPU, on two GPUs
(expert parallel: weak scaling = the same per-GPU batch, strong = the same global batch),
and several runs sharing one GPU. Ratios are taken between runs of this one call.

    python benchmarks/train_speed.py --data work/data/shakespeare-8k --out /tmp/speed \
        --table $OUT/train_speed.jsonl [--baseline-src .old/src] [--only study,wide]

Each run writes its run directory under --out/runs; the table (one row per run: model,
code, GPUs, batch, steady tokens/s = mean over the logged windows after the first two, MFU,
final validation loss) is appended to --table as each run ends. Code `compile` is this
checkout with `train.compile: true` (the dense parts through `torch.compile`). Models:
`study` (the GPU study's: d_model 512, 8 layers, 64 experts top-6 of width 256 + 1
shared; 35M active), `wide` (benchmarks/train_gpu.yaml: d_model 768, 12 layers; 120M
active), `wide2048` (d_model 2048, expert width 1024, 64 experts top-6: the MoE layer
benchmark's shape).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MODELS: dict[str, dict[str, Any]] = {
    "study": {"model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "n_dense_layers": 1,
                        "dense_hidden": 2048, "n_shared_experts": 1, "expert_hidden": 256},
              "train": {"batch_size": 32, "seq_len": 512}},
    "wide": {"model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_dense_layers": 1,
                       "dense_hidden": 3072, "n_shared_experts": 2, "expert_hidden": 384},
             "train": {"batch_size": 32, "seq_len": 1024}},
    "wide2048": {"model": {"d_model": 2048, "n_layers": 6, "n_heads": 16, "n_dense_layers": 1,
                           "dense_hidden": 8192, "n_shared_experts": 1, "expert_hidden": 1024},
                 "train": {"batch_size": 16, "seq_len": 1024}},
}


def run_config(model: str, data: Path, steps: int, batch: int) -> dict[str, Any]:
    """A V3-style run (sigmoid gates normalised, aux-loss-free bias, 64 experts top-6 on a
    modelled 8 nodes x 4 GPUs) of `model`, sized for a speed measurement."""
    m = copy.deepcopy(MODELS[model])
    return {
        "study": "speed", "dataset": "shakespeare", "strategy": model, "seed": 0,
        "data_dir": str(data), "data": {"source": "shakespeare", "vocab_size": 8192},
        "model": m["model"],
        "topology": {"num_nodes": 8, "gpus_per_node": 4},
        "router": {"num_experts": 64, "top_k": 6, "score_fn": "sigmoid", "normalize": True},
        "balance": {"bias": {"enabled": True, "rate": 1e-3}},
        "train": {**m["train"], "batch_size": batch, "steps": steps, "lr": 1e-3,
                  "warmup_steps": 10, "eval_every": 10 * steps, "eval_batches": 2,
                  "log_every": 10, "ckpt_every": 10 * steps, "trace_tokens": 512,
                  "device": "cuda"},
    }


def launch(src: Path, cfg: dict[str, Any], out: Path, gpus: int, cuda_devices: str
           ) -> subprocess.Popen[bytes]:
    """Start one `moebench train` (torchrun with `gpus` ranks when > 1) on `src`'s code."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    entry = ["-c", "import sys; from moebench.cli import app; sys.argv[0] = 'moebench'; app()"]
    args = ["train", "--config", str(out / "config.yaml"), "--out", str(out / "run"),
            "--ckpt-dir", str(out / "ckpt")]
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={gpus}", "--no-python", sys.executable, *entry, *args]
    else:
        cmd = [sys.executable, *entry, *args]
    env = {**os.environ, "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}",
           "CUDA_VISIBLE_DEVICES": cuda_devices}
    return subprocess.Popen(cmd, env=env, stdout=(out / "log.txt").open("wb"),
                            stderr=subprocess.STDOUT)


def measure(out: Path) -> dict[str, Any]:
    """Steady tokens/s and MFU (mean of the logged windows after the first two) and the
    final validation loss of a finished run directory."""
    timing = [json.loads(x) for x in (out / "run" / "timing.jsonl").read_text().splitlines()]
    steady = timing[2:] or timing
    tps = [r["tokens_per_s"] for r in steady]
    mfu = [r["mfu"] for r in steady if r["mfu"] is not None]
    summary = json.loads((out / "run" / "summary.json").read_text())
    return {"tokens_per_s": sum(tps) / len(tps), "mfu": sum(mfu) / len(mfu) if mfu else None,
            "val_loss": summary["val_loss"], "params_active": summary["params_active"],
            "params_total": summary["params_total"], "machine": summary["machine"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="run directories")
    ap.add_argument("--table", type=Path, required=True, help="the .jsonl table to append to")
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--only", default="study,wide,wide2048")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--plan", choices=("single", "scaling", "all"), default="all",
                    help="single: 1-GPU runs of every code; scaling: 1 vs 2 GPUs of --scale-code")
    ap.add_argument("--scale-code", default="new", choices=("new", "compile"))
    ap.add_argument("--codes", default="baseline,new,compile", help="codes of the single plan")
    ap.add_argument("--concurrent", type=int, default=3, help="runs sharing one GPU (study)")
    args = ap.parse_args()
    gpus = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda."
                               "device_count())"], capture_output=True, text=True).stdout)
    codes = {"new": Path("src").resolve(), "compile": Path("src").resolve()}
    if args.baseline_src is not None:
        codes["baseline"] = args.baseline_src.resolve()
    models = args.only.split(",")
    batch = {m: MODELS[m]["train"]["batch_size"] for m in models}
    plan: list[tuple[str, str, int, int, int]] = []  # model, code, gpus, batch, concurrent
    if args.plan in ("single", "all"):
        chosen = [c for c in args.codes.split(",") if c in codes]
        plan += [(m, code, 1, batch[m], 1) for m in models for code in chosen]
        if "study" in models:
            plan += [("study", "compile", 1, 2 * batch["study"], c) for c in (1, args.concurrent)]
    if args.plan in ("scaling", "all") and gpus >= 2:
        code = args.scale_code
        plan += [(m, code, g, b, 1) for m in models
                 for g, b in ((1, batch[m]), (2, batch[m]), (2, 2 * batch[m]))]
        if "study" in models:
            plan.append(("study", code, 1, batch["study"], args.concurrent))
    rows = []
    for model, code, n_gpus, batch, concurrent in plan:
        name = f"{model}-{code}-g{n_gpus}-b{batch}-c{concurrent}"
        cfg = run_config(model, args.data, args.steps, batch)
        cfg["train"]["compile"] = code == "compile"
        if code == "baseline":
            del cfg["train"]["compile"]
            cfg["model"]["expert_impl"] = "grouped"
            if n_gpus > 1:  # the old code needs world size == modelled devices
                cfg["topology"] = {"num_nodes": n_gpus, "gpus_per_node": 1}
        tic = time.time()
        procs = [launch(codes[code], cfg, args.out / "runs" / f"{name}-{i}", n_gpus,
                        ",".join(str(g) for g in range(n_gpus))) for i in range(concurrent)]
        codes_rc = [p.wait(timeout=400) for p in procs]
        row: dict[str, Any] = {"model": model, "code": code, "gpus": n_gpus,
                               "global_batch": batch, "concurrent": concurrent,
                               "wall_s": round(time.time() - tic, 1)}
        if any(codes_rc):
            row["error"] = f"exit {codes_rc}"
            log = (args.out / "runs" / f"{name}-0" / "log.txt").read_text()
            print(name, "failed:", log[-2000:])
        else:
            ms = [measure(args.out / "runs" / f"{name}-{i}") for i in range(concurrent)]
            row |= ms[0] | {"tokens_per_s": sum(m["tokens_per_s"] for m in ms)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with args.table.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
