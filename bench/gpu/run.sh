#!/usr/bin/env bash
# The GPU checks, in one run on a lent CUDA machine (about 8 minutes on an H200). From the
# repository root, after bench/gpu/prepare.sh here:
#
#   device run, carry [".whl"], timeout 600:
#       bash bench/gpu/run.sh
#
# It installs the carried wheels and the package (C++ extension built against the machine's
# torch), checks the fused op through the dispatcher on CUDA (opcheck), times the fused op against
# the unfused sequence and a device copy of the same bytes, and times SD-1.5 512² and SDXL 1024²
# (25 steps, gate 10, float16): baseline, reference tgate 1.0.0, T-GATE eager, fused and compiled.
# Everything lands in $OUT (GPU_RESULTS.md first), to be copied into bench/.
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | tail -3
python3 bench/gpu/gpu_checks.py --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log"
