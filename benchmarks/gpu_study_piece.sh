#!/usr/bin/env bash
# One device call of the GPU study (configs/gpu_study.yaml, issue 15): resume its Snakemake DAG
# on one H200 for at most BUDGET seconds, then copy every finished run directory (checkpoints
# stay behind in work/ckpt for the next call on the same warm machine) to $OUT.
# Usage, on the device machine from the repository root, with .whl (Snakemake, pydantic, ...
# for Python 3.12) and work/data/gpu_study (prepared here by the `data` rule) carried:
#   bash benchmarks/gpu_study_piece.sh BUDGET_S STRATEGY [STRATEGY ...]
# MLflow is off on the device (its wheels do not fit the carry limit); every run is logged to
# MLflow from the committed run directories later. The data rule is not allowed to run there:
# the corpus must be the carried one (its CPython part depends on the interpreter's stdlib).
set -uo pipefail
budget=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m moebench "$@"\n' >/tmp/bin/moebench
chmod +x /tmp/bin/moebench
export PATH=/tmp/bin:$PATH
printf 'tracking: {uri: null}\n' >/tmp/notrack.yaml

targets=()
for strategy in "$@"; do
    for seed in 0 1 2; do
        targets+=("work/runs/gpu_study/mixed/$strategy/seed~$seed/comm.json")
    done
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia-smi.csv"
start=$(date +%s)
timeout -s INT "$budget" python3 -m snakemake "${targets[@]}" --cores 16 --resources gpu=1 \
    --configfile configs/gpu_study.yaml /tmp/notrack.yaml \
    --allowed-rules resolve kernels train comm --rerun-incomplete --keep-going \
    --scheduler greedy >"$OUT/snakemake.log" 2>&1
echo "snakemake exit $? after $(($(date +%s) - start)) s"

# Finished runs (comm.json written last) travel back; logs and Snakemake's job benchmarks too.
for done_file in work/runs/gpu_study/mixed/*/seed~*/comm.json; do
    [ -e "$done_file" ] || continue
    run=$(dirname "$done_file")
    mkdir -p "$OUT/$run"
    cp -p "$run"/* "$OUT/$run/"
done
for extra in work/logs/gpu_study work/benchmarks/gpu_study work/kernels; do
    [ -e "$extra" ] && mkdir -p "$OUT/$(dirname "$extra")" && cp -rp "$extra" "$OUT/$(dirname "$extra")/"
done
ls work/runs/gpu_study/mixed/*/ 2>/dev/null
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("work/runs/gpu_study/mixed/*/seed~*/summary.json")):
    s = json.load(open(f))
    print(s["strategy"], s["seed"], f"ppl {s['val_ppl']:.3f}", f"{s['tokens_per_s']:.0f} tok/s",
          f"{s['elapsed_s']:.0f} s", f"MaxVio {s['maxvio_global']:.3f}")
PY
df -h work | tail -1
