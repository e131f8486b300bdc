#!/usr/bin/env sh
# The GPU checks, prepared to run in one go whenever a GPU is lent (under 5 minutes; not CI):
# correctness on the device against CPU float64, vmapped Gauss-Newton and exact products,
# the compiled path with CUDA graphs, then the amortised benchmark and the solver comparison
# in their quick modes on the device. Record the card's name (printed first) beside the figures.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY benchmarks/gpu_checks.py --device "$DEVICE"
$PY benchmarks/amortised.py --fast --no-progress --device "$DEVICE"
$PY benchmarks/overhead.py --fast --device "$DEVICE"
$PY benchmarks/hessian_modes.py --fast --device "$DEVICE"
$PY -m implicitfn compare --fast --no-progress --device "$DEVICE" --out outputs/compare-gpu
