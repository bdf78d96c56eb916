#!/usr/bin/env bash
# One device call for issue 7's kernel benchmarks (router and MoE layer), with the previous
# kernel versions timed beside the current ones ("moebench_prev") in the same run.
#
# Here, before the call (the device machine gets no .git):
#   mkdir -p .kprev && echo /.kprev/ >> .git/info/exclude
#   git show edb8ae0:src/moebench/kernels/router.py > .kprev/router_prev.py
#   git show edb8ae0:src/moebench/kernels/experts.py > .kprev/experts_prev.py
# Then: run(command="bash benchmarks/kernels_gpu.sh", carry=[".whl", ".kprev"], timeout_s=450)
# and unpack $OUT/results.tgz into results/benchmarks/ (router_compile.* holds the
# torch_compile rows of the same run, to merge into router.parquet).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
R=/tmp/res && mkdir -p "$R" "$R/compile"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw --format=csv >"$R/gpu.txt"
timeout 190 python3 benchmarks/router.py --out "$R" --baseline .kprev/router_prev.py \
  --providers moebench,moebench_prev,torch_eager 2>&1 | tee "$R/router_log.txt"
timeout 130 python3 benchmarks/moe_layer.py --out "$R" --baseline .kprev/experts_prev.py \
  --profile 2>&1 | tee "$R/moe_log.txt"
timeout 80 python3 benchmarks/router.py --out "$R/compile" --cases v3 --no-sweep \
  --providers torch_compile 2>&1 | tee "$R/compile_log.txt"
tar czf "${OUT:-/tmp}/results.tgz" -C "$R" .
cp "$R"/router.md "$R"/moe_layer.md "${OUT:-/tmp}/" 2>/dev/null
tail -n 40 "$R/router_log.txt" "$R/moe_log.txt"
