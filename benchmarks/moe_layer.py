"""MoE expert-layer benchmark on one GPU (bf16, forward and forward+backward).

    PYTHONPATH=src python benchmarks/moe_layer.py --out results/benchmarks

Providers: `moebench` (`moebench.kernels.grouped_experts`: sorted dispatch, gate and up as
one packed grouped GEMM, Triton scatter / gather-sum / SwiGLU kernels, no atomics),
`moebench_prev` (with `--baseline FILE`: an earlier experts module, e.g.
`git show REV:src/moebench/kernels/experts.py`, timed in the same run), `grouped_mm_plain`
(gather, three `_grouped_mm`, eager SwiGLU, `index_add` scatter, autograd everywhere),
`expert_loop` (one expert at a time: the reference and the slow end), `dense_ceiling` (the
same nine matrix products, fwd+bwd, as one dense FFN over all T*K rows: the rate the routed
layer could reach with free routing).

FLOPs: forward 3 products of 2*A*H*F (A = T*K), forward+backward 9 of them. Writes
`moe_layer.parquet` (gpu, provider, tokens, hidden, ffn_hidden, experts, top_k, pass,
median_ms, p20_ms, p80_ms, tflops, versions) and `moe_layer.md`. Timing: CUDA events around
each call after warm-up, median of repeats (each call is milliseconds, so launch overhead is
small; the loop provider synchronizes internally and cannot be graph-captured).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn import functional as F

from moebench.io import write_text
from moebench.kernels.bench import env_columns, load_baseline, write_results
from moebench.kernels.experts import grouped_experts, plan_dispatch

SHAPES = [  # tokens, hidden, ffn_hidden, experts, top_k
    (16384, 2048, 1024, 64, 6),
    (16384, 2048, 512, 256, 8),
]


def expert_loop(x, experts, weights, wg, wu, wd):
    """One expert at a time (boolean masks, eager SwiGLU, `index_add`): the reference."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(wg.shape[0]):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        h = x[tok]
        o = (F.silu(h @ wg[e]) * (h @ wu[e])) @ wd[e]
        y = y.index_add(0, tok, o.float() * weights[tok, slot, None].float())
    return y.to(x.dtype)


def grouped_mm_plain(x, experts, weights, wg, wu, wd):
    """The plain grouped path of issue 7: gather, three grouped products, scatter-add."""
    plan = plan_dispatch(experts, wg.shape[0])
    xs = x[plan.token]
    h = torch._grouped_mm(xs, wg, offs=plan.offsets)
    u = torch._grouped_mm(xs, wu, offs=plan.offsets)
    o = torch._grouped_mm(F.silu(h) * u, wd, offs=plan.offsets)
    w = weights.reshape(-1)[plan.order].to(o.dtype)
    return torch.zeros_like(x).index_add(0, plan.token, o * w[:, None])


def dense_products(xa, wg, wu, wd, do, backward):
    """The nine (or three) dense products of an FFN over all A rows, no element-wise work."""
    h = xa @ wg
    xa @ wu  # the up projection's product (its result is not needed here)
    o = h @ wd
    if not backward:
        return o
    dh = do @ wd.T
    return (h.T @ do, dh @ wg.T + dh @ wu.T, xa.T @ dh, xa.T @ dh)


def time_events(fn, reps: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}


def run_shape(T: int, H: int, Fh: int, E: int, K: int, reps: int, env: dict, baseline=None):
    """Check and time every provider at one shape; return (rows, checks)."""
    rows, checks = [], []
    dev, bf = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(T + H + E)
    x = torch.randn(T, H, device=dev, dtype=bf, generator=gen).requires_grad_()
    experts = torch.rand(T, E, device=dev, generator=gen).topk(K, dim=1).indices
    weights = torch.rand(T, K, device=dev, generator=gen).requires_grad_()
    wg, wu = (
        (torch.randn(E, H, Fh, device=dev, generator=gen) / H**0.5).to(bf).requires_grad_()
        for _ in range(2)
    )
    wd = (torch.randn(E, Fh, H, device=dev, generator=gen) / Fh**0.5).to(bf).requires_grad_()
    dy = torch.randn(T, H, device=dev, dtype=bf, generator=gen)
    params = [x, weights, wg, wu, wd]
    A = T * K
    xa = torch.randn(A, H, device=dev, dtype=bf, generator=gen)
    do = torch.randn(A, H, device=dev, dtype=bf, generator=gen)
    dense_w = (wg[0].detach(), wu[0].detach(), wd[0].detach())
    layer = {
        "moebench": grouped_experts,
        "grouped_mm_plain": grouped_mm_plain,
        "expert_loop": expert_loop,
    }
    if baseline is not None:
        layer["moebench_prev"] = baseline.grouped_experts
    grad_params = {name: params for name in layer}
    # correctness on the GPU: the grouped providers against the per-expert loop
    ref = expert_loop(x, experts, weights, wg, wu, wd)
    ref_g = torch.autograd.grad(ref, params, dy)
    for name in layer:
        if name == "expert_loop":
            continue
        y = layer[name](x, experts, weights, wg, wu, wd)
        gs = list(torch.autograd.grad(y, grad_params[name], dy))
        errs = [
            float((a.float() - b.float()).norm() / b.float().norm())
            for a, b in zip((y, *gs), (ref, *ref_g), strict=True)
        ]
        names = ["y", "dx", "dweights", "dw_gate", "dw_up", "dw_down"]
        checks.append(
            {"provider": name, "tokens": T, "hidden": H, "experts": E, "top_k": K}
            | dict(zip(names, errs, strict=True))
        )
        print(json.dumps(checks[-1]), flush=True)
    flops_fwd = 3 * 2 * A * H * Fh
    for name in [*layer, "dense_ceiling"]:
        for pass_ in ("forward", "forward+backward"):
            backward = pass_ == "forward+backward"
            if name == "dense_ceiling":

                def fn(backward=backward):
                    return dense_products(xa, *dense_w, do, backward)
            else:

                def fn(f=layer[name], backward=backward, ps=grad_params[name]):
                    if not backward:
                        with torch.no_grad():
                            return f(x, experts, weights, wg, wu, wd)
                    y = f(x, experts, weights, wg, wu, wd)
                    return torch.autograd.grad(y, ps, dy)

            t = time_events(fn, 5 if name == "expert_loop" else reps)
            flops = flops_fwd * (3 if backward else 1)
            rows.append(
                {
                    **env,
                    "provider": name,
                    "tokens": T,
                    "hidden": H,
                    "ffn_hidden": Fh,
                    "experts": E,
                    "top_k": K,
                    "pass": pass_,
                    **t,
                    "tflops": flops / (t["median_ms"] * 1e-3) / 1e12,
                }
            )
            print(
                f"T={T} H={H} F={Fh} E={E} K={K} {name:16s} {pass_:17s} "
                f"{t['median_ms']:8.3f} ms {rows[-1]['tflops']:6.1f} TFLOP/s",
                flush=True,
            )
    return rows, checks


def profile_shape(T: int, H: int, Fh: int, E: int, K: int, out: str) -> None:
    """Per-kernel GPU time of one `grouped_experts` forward+backward
    (torch.profiler), to show what bounds the layer: the grouped GEMMs vs the data movement
    around them."""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(T, H, device=dev, dtype=bf).requires_grad_()
    experts = torch.rand(T, E, device=dev).topk(K, dim=1).indices
    weights = torch.rand(T, K, device=dev).requires_grad_()
    ws = [
        (torch.randn(*shape, device=dev) * 0.02).to(bf).requires_grad_()
        for shape in ((E, H, Fh), (E, H, Fh), (E, Fh, H))
    ]
    dy = torch.randn(T, H, device=dev, dtype=bf)

    def step():
        y = grouped_experts(x, experts, weights, *ws)
        return torch.autograd.grad(y, [x, weights, *ws], dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    write_text(Path(out) / "moe_layer_profile.txt", f"{T=} {H=} {Fh=} {E=} {K=}, 5 steps\n{table}")
    print(table, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", action="store_true", help="also the per-kernel profile")
    ap.add_argument("--baseline", help="earlier experts module to time as moebench_prev")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline, "experts_prev") if args.baseline else None
    env = env_columns()
    rows, checks = [], []
    for shape in SHAPES:
        r, c = run_shape(*shape, reps=args.reps, env=env, baseline=baseline)
        rows += r
        checks += c
        write_results(
            rows,
            args.out,
            "moe_layer",
            ["provider", "tokens", "hidden", "ffn_hidden", "experts", "top_k", "pass",
             "median_ms", "tflops"],
        )  # fmt: skip
        write_results(
            [{**env, **c} for c in checks],
            args.out,
            "moe_layer_check",
            ["provider", "tokens", "hidden", "experts", "y", "dx", "dweights", "dw_gate",
             "dw_up", "dw_down"],
        )  # fmt: skip
    if args.profile:
        profile_shape(*SHAPES[0], out=args.out)


if __name__ == "__main__":
    main()
