#!/usr/bin/env bash
# The GPU loan's one command (benchmarks/gpu_check.py): at most 8 minutes, results under $2.
#   bash benchmarks/gpu_check.sh pbc224.npz gpu_check_out
# Extra arguments go to gpu_check.py (e.g. --tiny, --epochs 30, --budget_s 400).
set -euo pipefail
packed="${1:?usage: gpu_check.sh PACKED.npz OUT_DIR [args]}"
out="${2:?usage: gpu_check.sh PACKED.npz OUT_DIR [args]}"
shift 2
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec timeout --signal=TERM 480 python -m benchmarks.gpu_check --packed "$packed" --out "$out" "$@"
