#!/usr/bin/env bash
# Every benchmark, one after the other, on whatever device torch finds (CUDA when present, else the CPU); JSON
# figures go to benchmarks/results/<host kind>/<date>/ (`harness.host_kind`: cuda-<gpu>, cpu-amx,
# cpu-<vendor>-avx512bf16, ...), so that a figure names the kind of host it holds on.
# Usage: bash benchmarks/run_all.sh [--compile] [flags for every script, e.g. --repeats 2 --threads 2]
# --compile adds the torch.compile rows to the scripts that have them (unet.py, breakdown.py, vae.py, generate.py),
# and the Inductor backend's rows (AOTInductor, compiled into its cache once) to unet.py and generate.py.
set -euo pipefail
compile=()
common=()
for arg in "$@"; do
    if [[ $arg == --compile ]]; then compile=(--compile); else common+=("$arg"); fi
done
set -- ${common[@]+"${common[@]}"}
cd "$(dirname "$0")/.."
PY=${PY:-python}
kind=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); from harness import host_kind; print(host_kind())')
out="benchmarks/results/$kind/$(date +%Y-%m-%d-%H%M)"
mkdir -p "$out"
if $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    dtypes=(fp32 bf16)  # CUDA: SDPA picks flash / memory-efficient attention; --compile adds torch.compile rows
else
    dtypes=(fp32 bf16 int8)
fi
$PY benchmarks/roofline.py --json "$out/roofline.json" "$@"
$PY benchmarks/unet.py --dtype "${dtypes[@]}" --json "$out/unet.json" ${compile[@]+"${compile[@]}" --inductor} "$@"
$PY benchmarks/breakdown.py --dtype bf16 --json "$out/breakdown.json" ${compile[@]+"${compile[@]}"} "$@"
$PY benchmarks/vae.py --json "$out/vae.json" ${compile[@]+"${compile[@]}"} "$@"
$PY benchmarks/text.py --json "$out/text.json" "$@"
$PY benchmarks/train_step.py --json "$out/train_step.json" "$@"
$PY benchmarks/generate.py --dtype "${dtypes[@]}" --json "$out/generate.json" ${compile[@]+"${compile[@]}" --inductor} "$@"
echo "figures in $out"
