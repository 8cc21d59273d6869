"""The dtype a user after speed would run on this CPU, chosen by measuring, not by the flags.

A CPU with AMX runs bfloat16 matrix products about 3x faster than float32; one with AVX512-BF16
alone has native bfloat16 dot products but no faster path for the whole layer, and an earlier
run here measured bfloat16 1.5x slower. So where the CPU has native bfloat16 at all, a UNet's
two heavy operations, a linear layer and a 3x3 convolution at SD-1.5's widths, are timed in both
dtypes, interleaved, and the faster one is taken.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def _workload(dtype: torch.dtype):
    linear = torch.nn.Linear(320, 1280).to(dtype)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dtype)
    rows = torch.randn(1, 1024, 320, dtype=dtype)
    image = torch.randn(1, 320, 32, 32, dtype=dtype)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            linear(rows)
            conv(image)
        return time.perf_counter() - start

    return run


def fastest_cpu_dtype(rounds: int = 7) -> DtypeChoice:
    """bfloat16 where it is measured faster than float32 on this CPU, else float32, with why."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")):
        return DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX)")
    runs = {dtype: _workload(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for run in runs.values():
        run()  # first-call allocations and kernel choice
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in runs}
    for _ in range(rounds):
        for dtype, run in runs.items():
            times[dtype].append(run())
    ratio = statistics.median(times[torch.bfloat16]) / statistics.median(times[torch.float32])
    amx = "with AMX" if capabilities.get("amx_bf16") else "AVX512-BF16 without AMX"
    if ratio < 1:
        return DtypeChoice(torch.bfloat16, f"bfloat16: measured {1 / ratio:.2f}x faster than float32 on this CPU ({amx})")
    return DtypeChoice(torch.float32, f"float32: bfloat16 measured {ratio:.2f}x slower on this CPU ({amx})")
