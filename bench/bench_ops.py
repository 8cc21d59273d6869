"""Fused post-gate op vs the unfused eager PyTorch sequence it replaces.

CPU (C++ kernel, float32)::

    OMP_NUM_THREADS=1 pytest bench/bench_ops.py -k cpu --benchmark-timer=time.process_time \
        --benchmark-disable-gc --benchmark-columns=min,median,rounds

GPU (Triton kernel; skipped without CUDA)::

    pytest bench/bench_ops.py -k cuda --benchmark-disable-gc

Each shape is benchmarked in its own group with an ``eager`` and a ``fused`` test;
bench/conftest.py prints the speed-up and the achieved bandwidth per shape at the end.
Bytes are the fused op's minimum traffic (three (B, N, D) inputs read, two written,
plus the small per-channel operands), so both columns show useful bytes per second.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tgate_kernels import ops

# (model, B, N, D, variant).  SD-1.5/SDXL blocks normalise with norm3 (affine
# LayerNorm); PixArt blocks gate the self-attention and modulate an affine-free norm2.
SHAPES = [
    ("sd15", 1, 4096, 320, "sd"),
    ("sd15", 1, 1024, 640, "sd"),
    ("sd15", 1, 256, 1280, "sd"),
    ("sdxl", 1, 4096, 640, "sd"),
    ("sdxl", 1, 1024, 1280, "sd"),
    ("pixart", 1, 4096, 1152, "pixart"),
]
SHAPES = [(model, batch, n, d, variant) for model, _, n, d, variant in SHAPES for batch in (1, 2)]

# case name -> {"eager": s, "fused": s, "bytes": int, "copy_gbps": float}; read by conftest.py.
RESULTS: dict[str, dict[str, float]] = {}


def _case_id(shape) -> str:
    model, batch, n, d, _ = shape
    return f"{model}-B{batch}-N{n}-D{d}"


def _inputs(shape, dtype, device):
    model, batch, n, d, variant = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=dtype)

    hidden, attn, cross = randn(batch, n, d), randn(batch, n, d), randn(batch, n, d)
    if variant == "sd":
        kwargs = dict(weight=randn(d), bias=randn(d), eps=1e-5)
    else:
        kwargs = dict(gate=randn(batch, 1, d), scale=randn(batch, 1, d), shift=randn(batch, 1, d), eps=1e-6)
    small = sum(t.numel() for t in kwargs.values() if isinstance(t, torch.Tensor))
    traffic = (5 * hidden.numel() + small) * hidden.element_size()
    return (hidden, attn, cross), kwargs, traffic


def eager_post_gate(hidden, attn_out, cross, *, gate=None, weight=None, bias=None, eps=1e-5, scale=None, shift=None):
    """BasicTransformerBlock.forward's unfused sequence between self-attention and the FF."""
    if gate is not None:
        attn_out = gate * attn_out
    h = attn_out + hidden
    h = cross + h
    n = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    if scale is not None:
        n = n * (1 + scale) + shift
    return h, n


def _record(benchmark, impl, traffic):
    row = RESULTS.setdefault(benchmark.group, {"bytes": traffic})
    row[impl] = benchmark.stats.stats.median
    benchmark.extra_info["bytes"] = traffic
    benchmark.extra_info["GB/s"] = round(traffic / benchmark.stats.stats.median / 1e9, 2)
    return row


# --- CPU: C++ kernel, float32 --------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_kernel():
    if not ops.kernels_available("cpu"):
        pytest.skip(f"C++ extension not built: {ops.kernel_status()['cpu_extension_error']}")


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_cpu(benchmark, cpu_kernel, shape, impl):
    args, kwargs, traffic = _inputs(shape, torch.float32, "cpu")
    fn = eager_post_gate if impl == "eager" else ops.post_gate_residual_norm
    benchmark.group = f"cpu-fp32-{_case_id(shape)}"
    with torch.inference_mode():
        benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=30, warmup_rounds=3)
    _record(benchmark, impl, traffic)


# --- CUDA: Triton kernel ---------------------------------------------------------------

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="GPU benchmark: needs CUDA and triton",
)


def _synchronized(fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_cuda(benchmark, shape, impl, dtype):
    args, kwargs, traffic = _inputs(shape, dtype, "cuda")
    fn = eager_post_gate if impl == "eager" else ops.post_gate_residual_norm
    benchmark.group = f"cuda-{str(dtype).removeprefix('torch.')}-{_case_id(shape)}"
    with torch.inference_mode():
        benchmark.pedantic(_synchronized(fn), args=args, kwargs=kwargs, rounds=100, warmup_rounds=10)
    row = _record(benchmark, impl, traffic)
    if "copy_gbps" not in row:
        # Reference point: a device-to-device copy moving the same number of bytes.
        src = torch.empty(traffic // 2 // args[0].element_size(), dtype=dtype, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(10):
            dst.copy_(src)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        copy_s = start.elapsed_time(end) / 1e3 / 100
        row["copy_gbps"] = 2 * src.numel() * src.element_size() / copy_s / 1e9
