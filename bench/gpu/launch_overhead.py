"""Where the host time of the fused op's CUDA launch goes: a trivial Triton kernel's launch (the
floor on this machine), the op's kernel launched with precomputed arguments, the launcher, and a
cProfile of the launcher. Appends to ``OP_PROFILE.md`` in ``--out``.

    PYTHONPATH=. python3 bench/gpu/launch_overhead.py --out bench/out/gpu
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys

import torch
import triton
import triton.language as tl
from op_profile import host_and_device_us


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from tgate_kernels.ops._triton import _post_gate_residual_norm_kernel, post_gate_residual_norm_triton

    hidden, attn, cross = (torch.randn(2, 4096, 320, device="cuda", dtype=torch.float16) for _ in range(3))
    weight, bias = torch.ones(320, device="cuda", dtype=torch.float16), torch.zeros(320, device="cuda", dtype=torch.float16)
    h_out, n_out = torch.empty_like(hidden), torch.empty_like(hidden)
    src, dst = torch.randn(8192, device="cuda"), torch.empty(8192, device="cuda")
    strides = (*hidden.stride(),) * 3
    rows = 2 * 4096

    def raw():
        _post_gate_residual_norm_kernel[(rows,)](
            hidden, attn, cross, h_out, weight, bias, h_out, h_out, h_out, n_out, 4096, 320, *strides, 0, 0, 0, 1e-5,
            HAS_GATE=False, HAS_WEIGHT=True, HAS_BIAS=True, HAS_MODULATION=False, BLOCK_D=512, num_warps=2,
        )

    paths = {
        "trivial Triton kernel (3 args)": lambda: _copy_kernel[(8,)](src, dst, 8192, BLOCK=1024),
        "op kernel, precomputed arguments": raw,
        "op launcher (checks, outputs, launch)": lambda: post_gate_residual_norm_triton(hidden, attn, cross, None, weight, bias, 1e-5, None, None),
        "torch.empty x2 (the outputs)": lambda: (torch.empty_like(hidden), torch.empty_like(hidden)),
    }
    lines = ["", "## The launch's host time (sd15 B2 N4096 D320, float16)", "", "| path | host µs |", "| --- | ---: |"]
    for name, fn in paths.items():
        lines.append(f"| {name} | {host_and_device_us(fn)[0]:.1f} |")
        print(lines[-1], flush=True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(300):
        post_gate_residual_norm_triton(hidden, attn, cross, None, weight, bias, 1e-5, None, None)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    lines += ["", "cProfile of 300 launcher calls, by own time:", "", "```", *text.getvalue().strip().splitlines()[-22:], "```"]
    print("\n".join(lines[-26:]))
    with open(os.path.join(args.out, "OP_PROFILE.md"), "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
