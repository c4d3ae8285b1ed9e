#!/usr/bin/env bash
# Every benchmark, one after the other, on whatever device torch finds (CUDA when present, else the CPU);
# JSON figures go to benchmarks/results/<host>-<date>/. Usage: bash benchmarks/run_all.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/$(hostname)-$(date +%Y%m%d-%H%M)"
mkdir -p "$out"
python benchmarks/roofline.py --json "$out/roofline.json" "$@"
python benchmarks/unet.py --json "$out/unet.json" "$@"
python benchmarks/vae.py --json "$out/vae.json" "$@"
python benchmarks/text.py --json "$out/text.json" "$@"
python benchmarks/train_step.py --json "$out/train_step.json" "$@"
python benchmarks/generate.py --json "$out/generate.json" "$@"
echo "figures in $out"
