"""Where the fused post-gate op's time goes on CUDA: the host time of one call (what a
launch-bound denoiser waits for) and the device time of its kernel, for the op through the
dispatcher, the Triton launcher called directly, and the eager sequence it replaces. Writes
``OP_PROFILE.md`` into ``--out``.

    PYTHONPATH=. python3 bench/gpu/op_profile.py --out bench/out/gpu
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = [("sd15", 2, 4096, 320), ("sd15", 1, 1024, 640), ("sdxl", 2, 4096, 640), ("pixart", 2, 4096, 1152)]


def host_and_device_us(fn, calls: int = 300) -> tuple[float, float]:
    """Microseconds per call: host time to issue ``calls`` calls, and device time per call
    (CUDA events around the same loop, after it synchronised)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    start_event.record()
    for _ in range(calls):
        fn()
    end_event.record()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host, start_event.elapsed_time(end_event) / calls * 1e3


def kernel_us(fn, calls: int = 50) -> float:
    """Device time of the kernels alone (profiler), per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages())
    return total / calls


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from bench_ops import eager_post_gate

    from tgate_kernels import ops
    from tgate_kernels.ops._triton import post_gate_residual_norm_triton

    lines = [
        "# The fused op on CUDA: host and device time per call",
        "",
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, float16. Host: time to issue one call; "
        "device (events): wall time on the device per call in a loop of calls; kernels: the profiler's device time.",
        "",
        "| shape | path | host µs | device µs (events) | kernels µs |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for model, batch, n, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        hidden, attn, cross = (torch.randn(batch, n, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
        weight, bias = torch.ones(d, device="cuda", dtype=torch.float16), torch.zeros(d, device="cuda", dtype=torch.float16)
        paths = {
            "eager sequence": lambda: eager_post_gate(hidden, attn, cross, weight=weight, bias=bias, eps=1e-5),
            "torch.ops.tgate (dispatcher)": lambda: ops.post_gate_residual_norm(hidden, attn, cross, weight=weight, bias=bias, eps=1e-5),
            "Triton launcher directly": lambda: post_gate_residual_norm_triton(hidden, attn, cross, None, weight, bias, 1e-5, None, None),
        }
        for name, fn in paths.items():
            host, device = host_and_device_us(fn)
            lines.append(f"| {model} B{batch} N{n} D{d} | {name} | {host:.1f} | {device:.1f} | {kernel_us(fn):.1f} |")
            print(lines[-1], flush=True)
    with open(os.path.join(args.out, "OP_PROFILE.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
