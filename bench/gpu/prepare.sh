#!/usr/bin/env bash
# Run HERE (the development machine), before the device call: the device image has PyTorch,
# Triton, transformers and accelerate but neither diffusers nor the reference tgate. Their wheels
# go to .whl/ (git-ignored through .git/info/exclude), which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# pure-Python wheels: any platform does
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
    diffusers==0.42.1 tgate==1.0.0 DeepCache==0.1.1 importlib_metadata
ls -l .whl
