#!/usr/bin/env sh
# The GPU checks, prepared to run in one go whenever a GPU is lent (under 5 minutes; not CI):
# correctness on the device against CPU float64, vmapped Gauss-Newton and exact products,
# the compiled path with CUDA graphs, then benchmarks in their quick modes on the device.
# Record the card's name (printed first) beside the figures.
# compiled.py is left out: its --fast mode pays a cold inductor (Triton) compile on a fresh
# machine and times jaxopt on the CPU beside the GPU; gpu_checks.py already checks the compiled
# path with CUDA graphs. Run `compiled.py --fast --device "$DEVICE"` by hand if time is left.
# before_after.py has no --device: it imports an old commit's code.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY benchmarks/gpu_checks.py --device "$DEVICE"
$PY benchmarks/amortised.py --fast --no-progress --device "$DEVICE"
$PY benchmarks/overhead.py --fast --device "$DEVICE"
$PY benchmarks/hessian_modes.py --fast --device "$DEVICE"
$PY benchmarks/proximal_support.py --fast --device "$DEVICE"
$PY benchmarks/solvers_extra.py --fast --device "$DEVICE"
$PY benchmarks/imaml_vmap.py --fast --device "$DEVICE" --plot outputs/imaml_vmap-gpu.png
$PY benchmarks/scale.py --fast --device "$DEVICE"
$PY benchmarks/layerwise.py --fast --device "$DEVICE"
$PY -m implicitfn compare --fast --no-progress --device "$DEVICE" --out outputs/compare-gpu
