#!/usr/bin/env bash
# Run where the package index can be reached, before bench/gpu/run.sh on an offline CUDA machine
# that has PyTorch, Triton, transformers and accelerate but neither diffusers nor the reference
# tgate: their wheels go to .whl/ (git-ignored through .git/info/exclude), copied over with the
# repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# pure-Python wheels: any platform does
python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
    diffusers==0.42.1 tgate==1.0.0 DeepCache==0.1.1 importlib_metadata
ls -l .whl
