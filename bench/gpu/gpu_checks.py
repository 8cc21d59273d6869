"""The GPU checks of ``bench/gpu/run.sh``: the fused op through the dispatcher on CUDA, its
bandwidth against a device copy, SD-1.5 / SDXL end to end, and the joint-attention denoisers
(SD3.5 Large, FLUX.1-dev, Qwen-Image) baseline against T-GATE. Writes ``GPU_RESULTS.md`` (and
the raw JSON) into ``--out``.

    python3 bench/gpu/gpu_checks.py --out bench/out/gpu [--skip-sdxl] [--skip-joint]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def opcheck_on_cuda() -> list[str]:
    """``torch.library.opcheck`` of the op's CUDA registration (Triton kernel), every variant and
    dtype, and its agreement with the float64 reference."""
    from tgate_kernels import ops

    op = torch.ops.tgate.post_gate_residual_norm.default
    lines = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for variant in ("sd", "pixart"):
            gen = torch.Generator(device="cuda").manual_seed(0)
            hidden, attn, cross = (torch.randn(2, 77, 320, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
            if variant == "sd":
                extra = (None, torch.randn(320, device="cuda", dtype=dtype), torch.randn(320, device="cuda", dtype=dtype), 1e-5, None, None)
            else:
                gate, scale, shift = (torch.randn(2, 1, 320, device="cuda", dtype=dtype) for _ in range(3))
                extra = (gate, None, None, 1e-6, scale, shift)
            args = (hidden, attn, cross, *extra)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
            fused = op(*args)
            reference = ops.reference_post_gate_residual_norm(
                hidden, attn, cross, gate=extra[0], weight=extra[1], bias=extra[2], eps=extra[3], scale=extra[4],
                shift=extra[5], compute_dtype=torch.float64,
            )
            error = max(float((a.double() - b.double()).abs().max()) for a, b in zip(fused, reference))
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {variant} | opcheck passed | {error:.2e} |")
            log(f"opcheck {dtype} {variant}: max error {error:.2e}")
    return lines


def bandwidth() -> list[str]:
    """Fused op vs the eager sequence vs a device copy of the same bytes (fp16)."""
    import triton.testing
    from bench_ops import SHAPES, _inputs, eager_post_gate

    from tgate_kernels import ops

    lines = []
    for shape in SHAPES:
        (hidden, attn, cross), kwargs, traffic = _inputs(shape, torch.float16, "cuda")
        fused_ms = triton.testing.do_bench(lambda: ops.post_gate_residual_norm(hidden, attn, cross, **kwargs))
        eager_ms = triton.testing.do_bench(lambda: eager_post_gate(hidden, attn, cross, **kwargs))
        source = torch.empty(traffic // 4, dtype=torch.float16, device="cuda")
        target = torch.empty_like(source)
        copy_ms = triton.testing.do_bench(lambda: target.copy_(source))  # reads and writes traffic/2 each
        gbps = lambda ms: traffic / ms / 1e6  # noqa: E731
        model, batch, n, d, _ = shape
        lines.append(
            f"| {model} B{batch} N{n} D{d} | {eager_ms * 1e3:.1f} | {fused_ms * 1e3:.1f} | {eager_ms / fused_ms:.2f}× "
            f"| {gbps(fused_ms):.0f} | {gbps(copy_ms):.0f} | {fused_ms and copy_ms / fused_ms:.0%} |"
        )
        log(lines[-1])
    return lines


def end_to_end(model: str, resolution: int, compile: bool) -> list:
    from tgate_kernels.tools.benchmarking.suite import BenchOptions, run_bench

    options = BenchOptions(
        models=[], latency_models=[model], resolution=resolution, steps=25, gate_steps=[10], repeats=3,
        device="cuda", dtype=torch.float16, reference=True, compile=compile, resolutions=[], python_calls_model=None,
    )
    results = run_bench(options, lambda message: log(f"{model}: {message}"))
    return results.latency


def _cell(value) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def end_to_end_section(rows: list, resolution: int) -> list[str]:
    by_variant = {row.variant: row for row in rows}
    compiled_base = by_variant.get("baseline-compiled")
    lines = [
        "",
        f"## {rows[0].label}, {resolution}², 25 steps, gate 10, float16",
        "",
        "| variant | median s | vs baseline | vs baseline-compiled | MACs predict | vs reference | first call s | peak MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        vs_compiled = None
        if compiled_base is not None and compiled_base.median_s and row.median_s and row.variant.endswith("compiled"):
            vs_compiled = row.median_s / compiled_base.median_s
        cells = [row.variant, row.median_s, row.latency_ratio, vs_compiled, row.macs_ratio, row.latency_ratio_vs_reference,
                 row.first_call_s, row.peak_memory_mb]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if row.error:
            lines.append(f"| ({row.variant}: {row.error[:120]}) | | | | | | | |")
    return lines


def joint_attention_section(budget_s: float) -> tuple[list[str], dict]:
    """The joint-attention denoisers' generations at their defaults in bfloat16: baseline
    against T-GATE at 40 % of the steps (the MACs ratios are bench/RESULTS.md's)."""
    from tgate_kernels.tools.benchmarking.architectures import architecture
    from tgate_kernels.tools.benchmarking.loop_latency import loop_latency

    lines = [
        "",
        "## Joint attention: the denoiser's generation alone, bfloat16, released configs, random weights",
        "",
        "| model | size | steps | gate | baseline s | T-GATE s | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    raw = {}
    for model in ("sd35-large", "flux1-dev", "qwen-image"):
        if time.perf_counter() - START > budget_s:
            lines.append(f"| {model}: not run, the time budget ({budget_s:.0f} s) was spent | | | | | | |")
            break
        try:
            timed = loop_latency(architecture(model), device="cuda", dtype=torch.bfloat16, rounds=3)
        except Exception as error:  # one model failing keeps the others' results
            log(f"{model}: {type(error).__name__}: {error}")
            lines.append(f"| {model}: failed: {type(error).__name__}: {str(error)[:200]} | | | | | | |")
            continue
        finally:
            torch.cuda.empty_cache()
        raw[model] = timed.__dict__
        lines.append(
            f"| {timed.label} | {timed.resolution}² | {timed.steps} | {timed.gate_step} | {timed.baseline_s:.3f} "
            f"| {timed.tgate_s:.3f} | {timed.ratio:.3f} |"
        )
        log(lines[-1])
    return lines, raw


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--skip-joint", action="store_true", help="skip SD3.5 Large, FLUX.1-dev and Qwen-Image")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no end-to-end model once this many seconds have passed (the results so far are kept)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    assert torch.cuda.is_available(), "no CUDA device"
    name = torch.cuda.get_device_name(0)
    log(f"{name}, torch {torch.__version__}")
    sections: list[str] = []
    raw: dict = {}

    def write() -> None:
        # after every section, so that a run cut short keeps what it measured
        with open(os.path.join(args.out, "GPU_RESULTS.md"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(sections + ["", f"Time of the checks so far: {time.perf_counter() - START:.0f} s."]) + "\n")
        with open(os.path.join(args.out, "gpu_results.json"), "w", encoding="utf-8") as handle:
            json.dump(raw, handle, indent=2, default=str)

    sections += [
        "# GPU results",
        "",
        f"Machine: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}. Command (after `bench/gpu/prepare.sh` "
        f"on the development machine): `bash bench/gpu/run.sh` on the device machine, `.whl` carried.",
        "",
        "## The fused op through the dispatcher on CUDA",
        "",
        "| dtype | variant | `torch.library.opcheck` | max abs error vs float64 |",
        "| --- | --- | --- | ---: |",
        *opcheck_on_cuda(),
    ]
    write()
    sections += [
        "",
        "## Bandwidth (float16, `triton.testing.do_bench` medians)",
        "",
        "Bytes: three (B, N, D) inputs read and two written (the fused op's minimum traffic); the copy roof is a "
        "device-to-device copy of as many bytes.",
        "",
        "| shape | eager µs | fused µs | speed-up | fused GB/s | copy GB/s | of copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *bandwidth(),
    ]
    write()
    # compiling takes minutes per graph: SD-1.5 shows compiled T-GATE against the compiled
    # baseline; SDXL runs the eager variants, inside the run's 8 minutes
    for model, resolution, compile in (("sd15", 512, True), ("joint", 1024, False), ("sdxl", 1024, False)):
        if model == "sdxl" and args.skip_sdxl or model == "joint" and args.skip_joint:
            continue
        if model == "joint":
            lines, raw["joint_attention"] = joint_attention_section(args.budget_s)
            sections += lines
            write()
            continue
        if time.perf_counter() - START > args.budget_s:
            sections += ["", f"{model} {resolution}²: not run, the time budget ({args.budget_s:.0f} s) was spent."]
            break
        try:
            rows = end_to_end(model, resolution, compile)
        except Exception as error:  # one model failing keeps the others' results
            log(f"{model}: {type(error).__name__}: {error}")
            sections += ["", f"{model} {resolution}²: failed: {type(error).__name__}: {str(error)[:300]}"]
            write()
            continue
        raw[model] = [row.__dict__ for row in rows]
        sections += end_to_end_section(rows, resolution)
        write()
    write()
    log("written " + os.path.join(args.out, "GPU_RESULTS.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
