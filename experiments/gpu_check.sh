#!/usr/bin/env bash
# The prepared accelerator check (for the `device` tool or any NVIDIA/TPU node with jax, flax, optax).
# Usage: bash experiments/gpu_check.sh [OUTPUT_DIR]   -> OUTPUT_DIR/gpu_check.json and gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import jax; print('devices:', jax.devices())" 2>&1 | tee "$out/gpu_check.log"
timeout 540 python3 experiments/gpu_check.py --output="$out/gpu_check.json" 2>&1 | tee -a "$out/gpu_check.log"
