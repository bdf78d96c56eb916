"""Router benchmark on one GPU: the fused Triton router vs the PyTorch reference (eager and
torch.compile), forward and forward+backward, against the HBM floor.

    PYTHONPATH=src python benchmarks/router.py --out results/benchmarks

Writes `router.parquet` (long format: gpu, provider, case, tokens, pass, median_us, p20_us,
p80_us, floor_us, versions) and `router.md`; first checks the kernel against the reference
on CUDA (ids in the reference's order and as sets, gates, logit gradients, load) and sweeps
the launch shape. `--baseline FILE` also times an earlier router module (provider
`moebench_prev`, e.g. `git show REV:src/moebench/kernels/router.py`) in the same run.

Floors (bytes / measured copy rate): forward = read logits once + write ids (int64) and gates
(float32); backward = read ids and gate gradients + write the logit gradient (+ read the
logits again for softmax, whose gradient is dense). Cases (issue 7): v3 = E 256, 8 groups
keep 4 (top-2 sum), top-8, sigmoid + bias, normalized x2.5; v2 = E 160, 8 groups keep 3
(max), top-6 softmax x16; e64 = E 64 top-6 softmax. Logits float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from moebench.kernels.bench import (
    copy_bandwidth,
    env_columns,
    load_baseline,
    time_graph,
    write_results,
)
from moebench.kernels.router import (
    Launch,
    default_launch,
    route_fused,
    router_backward,
    router_forward,
)
from moebench.routing import RouterConfig, gate_weights, preset, scores, select_experts

CASES: dict[str, RouterConfig] = {
    "v3": preset("v3"),
    "v2": preset("v2"),
    "e64": RouterConfig(num_experts=64, top_k=6, score_fn="softmax"),
}
NUM_INPUTS = 4  # rotate input sets so the largest cases do not run from L2


def reference(logits_TE: torch.Tensor, cfg: RouterConfig, bias_E: torch.Tensor | None):
    """`route` without its host-synchronizing input checks (so it can be graph-captured)."""
    s = scores(logits_TE, cfg.score_fn)
    key = s if bias_E is None else s + bias_E
    with torch.no_grad():
        experts = select_experts(key, cfg)
    return experts, gate_weights(s, experts, cfg)


def make_inputs(cfg: RouterConfig, T: int, case: str, grad: bool):
    gen = torch.Generator(device="cuda").manual_seed(T)
    xs = [
        torch.randn(T, cfg.num_experts, device="cuda", generator=gen).requires_grad_(grad)
        for _ in range(NUM_INPUTS)
    ]
    bias = (
        0.05 * torch.randn(cfg.num_experts, device="cuda", generator=gen) if case == "v3" else None
    )
    g = torch.randn(T, cfg.top_k, device="cuda", generator=gen)
    return xs, bias, g


def check(case: str, cfg: RouterConfig, T: int, launch: Launch) -> dict:
    """Kernel vs the PyTorch reference on CUDA (`route` itself would dispatch to the kernel):
    ids as sets and in order, max gate and gradient errors, load equality."""
    xs, bias, g = make_inputs(cfg, T, case, grad=True)
    z = xs[0]
    fused = route_fused(z, cfg, bias, launch)
    ref = reference(z, cfg, bias)
    ref_experts = ref[0]
    o_f, o_r = fused.experts.argsort(1), ref_experts.argsort(1)
    w_f, w_r = fused.weights.gather(1, o_f), ref[1].gather(1, o_r)
    (gf,) = torch.autograd.grad((w_f * g).sum(), z)
    (gr,) = torch.autograd.grad((w_r * g).sum(), z)
    load = torch.bincount(ref_experts.flatten(), minlength=cfg.num_experts)
    return {
        "case": case,
        "tokens": T,
        "ids_equal": bool((fused.experts.sort(1).values == ref_experts.sort(1).values).all()),
        "order_equal_frac": float((fused.experts == ref_experts).all(1).float().mean()),
        "max_weight_err": float((w_f - w_r).abs().max()),
        "max_grad_err": float((gf - gr).abs().max()),
        "load_equal": bool((fused.load == load).all()),
    }


def fwd_bytes(cfg: RouterConfig, T: int) -> int:
    return T * cfg.num_experts * 4 + T * cfg.top_k * (8 + 4)


def bwd_bytes(cfg: RouterConfig, T: int) -> int:
    dense = T * cfg.num_experts * 4 * (2 if cfg.score_fn == "softmax" else 1)
    return dense + T * cfg.top_k * (8 + 4)


def providers(cfg: RouterConfig, fwd_launch: Launch, bwd_launch: Launch, baseline=None):
    """name -> (forward fn, forward+backward fn), each taking (logits, bias, gate grad);
    `baseline`: an earlier router module, timed with its own default launch shapes."""

    def mb_fwd(z, b, _g):
        return router_forward(z, cfg, b, fwd_launch)

    def mb_fb(z, b, g):
        f = route_fused(z, cfg, b, fwd_launch, bwd_launch)
        return torch.autograd.grad(f.weights, z, g)

    def ref_fwd(z, b, _g):
        return reference(z, cfg, b)

    def ref_fb(z, b, g):
        _, w = reference(z, cfg, b)
        return torch.autograd.grad(w, z, g)

    compiled = torch.compile(reference, dynamic=True)

    def comp_fwd(z, b, _g):
        return compiled(z, cfg, b)

    def comp_fb(z, b, g):
        _, w = compiled(z, cfg, b)
        return torch.autograd.grad(w, z, g)

    provs = {
        "moebench": (mb_fwd, mb_fb),
        "torch_eager": (ref_fwd, ref_fb),
        "torch_compile": (comp_fwd, comp_fb),
    }
    if baseline is not None:

        def prev_fwd(z, b, _g):
            return baseline.router_forward(z, cfg, b)

        def prev_fb(z, b, g):
            return torch.autograd.grad(baseline.route_fused(z, cfg, b).weights, z, g)

        provs["moebench_prev"] = (prev_fwd, prev_fb)
    return provs


FWD_LAUNCHES = [  # (warps, lanes per row (0 = auto), atomic load count, programs per SM)
    Launch(num_warps=w, lanes_per_row=lanes, atomic_load=atomic, programs_per_sm=pps)
    for w, lanes, atomic, pps in (
        (1, 0, False, 32),
        (1, 0, False, 16),
        (1, 0, False, 8),
        (2, 0, False, 16),
        (2, 0, False, 8),
        (1, 0, True, 32),
    )
]
BWD_LAUNCHES = [  # (rows per program, warps): the front-runners of the first sweep
    Launch(block_t, warps, max(1, 64 // warps))
    for block_t, warps in ((1, 1), (2, 1), (4, 2), (8, 4))
]


def sweep(case: str, cfg: RouterConfig, T: int) -> tuple[Launch, Launch, list[dict]]:
    """Time both kernels over launch shapes at T tokens; return the fastest of each."""
    xs, bias, g = make_inputs(cfg, T, case, grad=False)
    ids = router_forward(xs[0], cfg, bias)[0]
    results = []
    for backward, launches in ((False, FWD_LAUNCHES), (True, BWD_LAUNCHES)):
        for launch in launches:
            if backward:

                def fn(i, launch=launch):
                    return router_backward(xs[i], ids, g, cfg, launch)
            else:

                def fn(i, launch=launch):
                    return router_forward(xs[i], cfg, bias, launch)

            t = time_graph(fn, NUM_INPUTS, calls=10, reps=10, warmup=1)
            results.append({"case": case, "backward": backward, **asdict(launch), **t})
    best = [
        min((r for r in results if r["backward"] == b), key=lambda r: r["median_us"])
        for b in (False, True)
    ]
    fields = ("block_t", "num_warps", "programs_per_sm", "lanes_per_row", "atomic_load")
    fwd, bwd = (Launch(**{f: r[f] for f in fields}) for r in best)
    return fwd, bwd, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="4096,16384,65536,262144")
    ap.add_argument("--cases", default="v3,v2,e64")
    ap.add_argument("--providers", default="moebench,torch_eager,torch_compile")
    ap.add_argument("--no-sweep", action="store_true", help="use the default launch shapes")
    ap.add_argument("--sweep-cases", default="v3", help="cases whose launch shape is swept")
    ap.add_argument("--compile-cases", default="v3,v2,e64", help="cases timed with torch_compile")
    ap.add_argument("--baseline", help="earlier router module to time as moebench_prev")
    ap.add_argument("--baseline-cases", default="v3,v2,e64", help="cases timed as moebench_prev")
    args = ap.parse_args()
    baseline = load_baseline(args.baseline, "router_prev") if args.baseline else None
    token_list = [int(t) for t in args.tokens.split(",")]
    wanted = args.providers.split(",")
    env = env_columns()
    bw = copy_bandwidth()
    print(f"{env['gpu']}: copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows, checks, sweeps = [], [], []
    for case in args.cases.split(","):
        cfg = CASES[case]
        if args.no_sweep or case not in args.sweep_cases.split(","):
            fwd_launch = default_launch(cfg, torch.device("cuda"))
            bwd_launch = default_launch(cfg, torch.device("cuda"), backward=True)
        else:
            fwd_launch, bwd_launch, s = sweep(case, cfg, 65536)
            sweeps += s
        print(f"{case}: fwd {fwd_launch}, bwd {bwd_launch}", flush=True)
        for T in (1, 1000, 65536):
            checks.append(check(case, cfg, T, fwd_launch))
            print(json.dumps(checks[-1]), flush=True)
        provs = providers(cfg, fwd_launch, bwd_launch, baseline)
        for T in token_list:
            xs, bias, g = make_inputs(cfg, T, case, grad=True)
            xs_nograd = [x.detach() for x in xs]
            floors = {
                "forward": fwd_bytes(cfg, T) / bw * 1e6,
                "forward+backward": (fwd_bytes(cfg, T) + bwd_bytes(cfg, T)) / bw * 1e6,
            }
            for name in wanted:
                if name == "torch_compile" and case not in args.compile_cases.split(","):
                    continue
                if name == "moebench_prev" and case not in args.baseline_cases.split(","):
                    continue
                fwd, fb = provs[name]
                fast = name.startswith("moebench")
                for pass_, fn, inputs in (
                    ("forward", fwd, xs_nograd),
                    ("forward+backward", fb, xs),
                ):
                    try:
                        t = time_graph(
                            lambda i, fn=fn, inputs=inputs, bias=bias, g=g: fn(inputs[i], bias, g),
                            NUM_INPUTS,
                            calls=20 if fast else 5,
                            reps=30 if fast else 12,
                        )
                    except Exception as err:  # record the failure, keep the other numbers
                        print(f"{case} T={T} {name} {pass_}: FAILED {err!r}", flush=True)
                        continue
                    rows.append(
                        {
                            **env,
                            "provider": name,
                            "case": case,
                            "tokens": T,
                            "experts": cfg.num_experts,
                            "top_k": cfg.top_k,
                            "pass": pass_,
                            **t,
                            "floor_us": floors[pass_],
                            "copy_tb_s": bw / 1e12,
                            "launch": json.dumps(
                                {"fwd": asdict(fwd_launch), "bwd": asdict(bwd_launch)}
                            )
                            if name == "moebench"
                            else "",
                        }
                    )
                    print(
                        f"{case:4s} T={T:7d} {name:14s} {pass_:17s} "
                        f"{t['median_us']:9.1f} us  floor {floors[pass_]:7.1f}",
                        flush=True,
                    )
        save(args.out, rows, checks, sweeps)
    if not all(c["ids_equal"] and c["load_equal"] for c in checks):
        sys.exit("kernel disagrees with the reference (see router_check.md)")


def save(out: str, rows: list[dict], checks: list[dict], sweeps: list[dict]) -> None:
    """Write what is measured so far (called after every case, so a timeout keeps results)."""
    env = env_columns()
    if rows:
        write_results(
            rows,
            out,
            "router",
            ["provider", "case", "tokens", "pass", "median_us", "p20_us", "p80_us", "floor_us"],
        )
    write_results(
        [{**env, **c} for c in checks],
        out,
        "router_check",
        ["case", "tokens", "ids_equal", "order_equal_frac", "max_weight_err", "max_grad_err",
         "load_equal"],
    )  # fmt: skip
    if sweeps:
        write_results(
            [{**env, **s} for s in sweeps],
            out,
            "router_sweep",
            ["case", "backward", "block_t", "num_warps", "lanes_per_row", "atomic_load",
             "programs_per_sm", "median_us"],
        )  # fmt: skip


if __name__ == "__main__":
    main()
