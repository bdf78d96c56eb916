#!/usr/bin/env bash
# The wheels a device call carries in .whl (git-ignored) so that the GPU image's Python 3.12
# runs Snakemake and moebench's CLI: Snakemake, pydantic and pandera at pyproject's pins, with
# every package they need, as resolved by pip here. The GPU image has torch, triton, numpy,
# pandas, pyarrow and the rest of moebench's runtime needs; MLflow stays behind (too large).
# Binary wheels for CPython 3.12 where PyPI has them, else built here (pure Python sdists).
#   bash benchmarks/device_wheels.sh   # then run(..., carry=[".whl", ...])
# On the device: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site
# .whl/*.whl, then PYTHONPATH=/tmp/site:src (benchmarks/gpu_study_piece.sh does it).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pins=$(python3 - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if re.match(r"(snakemake|pydantic|pandera)\b", d)
               and not d.startswith("snakemake-executor")))
EOF
)
# shellcheck disable=SC2086  # the pins are one word each
python3 -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" $pins
python3 -c 'import json, sys
for p in json.load(open(sys.argv[1]))["install"]:
    print(p["metadata"]["name"] + "==" + p["metadata"]["version"])' "$tmp/report.json" \
  > "$tmp/resolved"
rm -rf .whl && mkdir .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64)
while read -r pin; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pin" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$pin"
done < "$tmp/resolved"
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl"
