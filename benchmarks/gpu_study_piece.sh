#!/usr/bin/env bash
# One device call of the GPU study (configs/gpu_study.yaml, issue 15): resume its Snakemake DAG
# on one H200 for at most BUDGET seconds, then copy every finished run directory (checkpoints
# stay behind in work/ckpt for the next call on the same warm machine) to $OUT.
# Usage, on the device machine from the repository root, with .whl (Snakemake, pydantic, ...
# for Python 3.12) and work/gpu_study_data.tar.xz carried (the `data` rule's output made here,
# `tar cJf work/gpu_study_data.tar.xz work/data/gpu_study`: 4 MB instead of 19):
#   bash benchmarks/gpu_study_piece.sh BUDGET_S STRATEGY [STRATEGY ...]
# Finished runs come back as $OUT/gpu_study_piece.tgz.* (cat them | tar xz); commit them under
# results/reference/gpu_study without routing_trace.parquet (see its README.md).
# MLflow is off on the device (its wheels do not fit the carry limit); every run is logged to
# MLflow from the committed run directories later. The data rule is not allowed to run there:
# the corpus must be the carried one (its CPython part depends on the interpreter's stdlib).
set -uo pipefail
[ -d work/data/gpu_study ] || tar xJf work/gpu_study_data.tar.xz || exit 1
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
mkdir -p work/logs/gpu_study
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >work/logs/gpu_study/nvidia-smi.csv
start=$(date +%s)
timeout -s INT "$budget" python3 -m snakemake "${targets[@]}" --cores 16 --resources gpu=1 \
    --configfile configs/gpu_study.yaml /tmp/notrack.yaml \
    --allowed-rules resolve kernels train comm --rerun-incomplete --keep-going \
    --scheduler greedy >work/logs/gpu_study/snakemake.log 2>&1
echo "snakemake exit $? after $(($(date +%s) - start)) s"

# Finished runs (comm.json written last), logs and Snakemake's job benchmarks travel back as
# one archive in 15 MB pieces (the return path takes 8 files of 16 MiB, 2 folders deep).
done_runs=$(ls -d work/runs/gpu_study/mixed/*/seed~*/comm.json 2>/dev/null | xargs -r -n1 dirname)
tar czf - $done_runs work/logs/gpu_study work/benchmarks/gpu_study work/kernels |
    split -b 15M - "$OUT/gpu_study_piece.tgz."
ls work/runs/gpu_study/mixed/*/ 2>/dev/null
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("work/runs/gpu_study/mixed/*/seed~*/summary.json")):
    s = json.load(open(f))
    print(s["strategy"], s["seed"], f"ppl {s['val_ppl']:.3f}", f"{s['tokens_per_s']:.0f} tok/s",
          f"{s['elapsed_s']:.0f} s", f"MaxVio {s['maxvio_global']:.3f}")
PY
df -h work | tail -1
