#!/usr/bin/env bash
# One device call of the GPU study (configs/gpu_study.yaml, issue 15): resume its Snakemake DAG
# on one H200 for at most BUDGET seconds, then copy every finished run directory (checkpoints
# stay behind in work/ckpt for the next call on the same warm machine) to $OUT.
# With several GPUs (nvidia-h200-x2) each runs its share of the strategies.
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
# the corpus every committed run trained on (results/reference/gpu_study/data.json), or nothing
sha256sum --quiet -c <(python3 -c 'import json
for s in json.load(open("results/reference/gpu_study/data.json"))["splits"].values():
    print(s["sha256"] + "  work/data/gpu_study/mixed/" + s["file"])') || exit 1
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

# Strategies are dealt round-robin to the GPUs; GPU g > 0 runs its own Snakemake in its own
# copy of the repository (/tmp/gpu$g: Snakemake hands out no per-job GPU index).
ngpu=$(nvidia-smi -L | wc -l)
mkdir -p work/logs/gpu_study
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >work/logs/gpu_study/nvidia-smi.csv
strategies=("$@")
dirs=()
start=$(date +%s)
for ((g = 0; g < ngpu; g++)); do
    dir=$PWD
    if ((g > 0)); then
        dir=/tmp/gpu$g
        mkdir -p "$dir/work"
        tar --exclude=./.whl --exclude=./.venv --exclude=./.git --exclude=./work -cf - . | tar -xf - -C "$dir"
        cp -a work/data "$dir/work/"
    fi
    dirs+=("$dir")
    targets=()
    for ((i = g; i < ${#strategies[@]}; i += ngpu)); do
        for seed in 0 1 2; do
            targets+=("work/runs/gpu_study/mixed/${strategies[i]}/seed~$seed/comm.json")
        done
    done
    ((${#targets[@]})) || continue
    (cd "$dir" && CUDA_VISIBLE_DEVICES=$g timeout -s INT "$budget" python3 -m snakemake \
        "${targets[@]}" --cores 16 --resources gpu=1 \
        --configfile configs/gpu_study.yaml /tmp/notrack.yaml \
        --allowed-rules resolve kernels train comm --rerun-incomplete --keep-going \
        --scheduler greedy >"/tmp/snakemake.gpu$g.log" 2>&1
     echo "GPU $g: snakemake exit $? after $(($(date +%s) - start)) s") &
done
wait
cp /tmp/snakemake.gpu*.log work/logs/gpu_study/

# Finished runs (comm.json written last), logs and Snakemake's job benchmarks travel back as
# one archive in 15 MB pieces (the return path takes 8 files of 16 MiB, 2 folders deep).
members=()
for dir in "${dirs[@]}"; do
    done_runs=$(cd "$dir" && ls -d work/runs/gpu_study/mixed/*/seed~*/comm.json 2>/dev/null |
        xargs -r -n1 dirname)
    done_runs+=" $(cd "$dir" && ls -d work/benchmarks/gpu_study 2>/dev/null)"
    [ -n "${done_runs// /}" ] && members+=(-C "$dir" $done_runs)
done
tar czf - work/logs/gpu_study work/kernels "${members[@]}" | split -b 15M - "$OUT/gpu_study_piece.tgz."
python3 - "${dirs[@]}" <<'PY'
import glob, json, sys
runs = (f for d in sys.argv[1:] for f in glob.glob(f"{d}/work/runs/gpu_study/mixed/*/seed~*/summary.json"))
for f in sorted(runs):
    s = json.load(open(f))
    print(s["strategy"], s["seed"], f"ppl {s['val_ppl']:.3f}", f"{s['tokens_per_s']:.0f} tok/s",
          f"{s['elapsed_s']:.0f} s", f"MaxVio {s['maxvio_global']:.3f}")
PY
df -h work | tail -1
