#!/usr/bin/env bash
# The GPU checks in one run (about 8 minutes on an H200), on a CUDA machine that has PyTorch,
# Triton, transformers and accelerate but no network: run bench/gpu/prepare.sh where the package
# index can be reached, copy the repository with its .whl/ folder over, and from its root run
#
#       bash bench/gpu/run.sh          # OUT=... to choose where the results go
#
# It installs the wheels from .whl/ and the package (C++ extension built against the machine's
# torch), checks the fused op through the dispatcher on CUDA (opcheck), times the fused op against
# the unfused sequence and a device copy of the same bytes, and times SD-1.5 512² and SDXL 1024²
# (25 steps, gate 10, float16): baseline, reference tgate 1.0.0, T-GATE eager and fused, and for
# SD-1.5 compiled T-GATE against the baseline compiled the same way; and the joint-attention
# denoisers (SD3.5 Large, FLUX.1-dev, Qwen-Image at 1024², bfloat16) baseline against T-GATE.
# Everything lands in $OUT (GPU_RESULTS.md first), to be copied into bench/.
set -uo pipefail
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . 2>&1 | tail -3
python3 bench/gpu/gpu_checks.py --out "$OUT" 2>&1 | tee "$OUT/gpu_checks.log"
