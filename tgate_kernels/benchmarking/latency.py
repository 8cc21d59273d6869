"""Latency and peak memory of a generation: plain pipeline, T-GATE, and the reference ``tgate``.

What is timed: one ordinary pipeline call, ``pipe(prompt_embeds=..., output_type="latent")``, of
the real pipeline class around the real-architecture denoiser (random weights): input checks,
scheduler, the whole denoising loop with the pipeline's own guidance arithmetic, and every hook
T-GATE adds. Text encoding and VAE decoding are left out (the prompt embeddings are given, the
latents returned): T-GATE does not touch them and they would only dilute the ratio by a
constant. Variants are measured alternately (baseline, T-GATE, reference, baseline, ...), so
drifts of the machine hit them alike; the median of the repeats is reported.

T-GATE is timed as ``tgate-eager`` (``kernels="off"``: plain PyTorch, the reference's exact
arithmetic), ``tgate`` (``kernels="auto"``: the fused post-gate block fast path) and, when asked,
``tgate-compiled`` (the fast path with the denoiser under ``torch.compile``; compiled once,
before the timed calls, on its own copy of the denoiser so no other variant disturbs its graphs).

The reference package replaces the forward of every attention module it runs on and leaves it
replaced, so it gets its own pipeline over a copy of the denoiser.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .architectures import Architecture
from .memory import PeakMemory
from .pipelines import build_timing_pipeline, pipeline_call_kwargs

BASELINE, TGATE_EAGER, TGATE, TGATE_COMPILED, REFERENCE = (
    "baseline", "tgate-eager", "tgate", "tgate-compiled", "reference"
)
TGATE_VARIANTS = (TGATE_EAGER, TGATE, TGATE_COMPILED)


@dataclass
class VariantTiming:
    variant: str
    seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_peak_memory_bytes(self) -> int | None:
        return int(statistics.median(self.peak_memory_bytes)) if self.peak_memory_bytes else None


@dataclass
class LatencyResult:
    model: str
    resolution: int
    steps: int
    gate_step: int
    device: str
    dtype: str
    repeats: int
    memory_measure: str
    variants: dict[str, VariantTiming]

    def ratio(self, variant: str, to: str = BASELINE) -> float | None:
        a, b = self.variants.get(variant), self.variants.get(to)
        if a is None or b is None or a.median_s is None or b.median_s is None:
            return None
        return a.median_s / b.median_s


def reference_caller(arch: Architecture, ref_pipe, settings: dict) -> Callable[[dict], object]:
    import tgate

    if arch.deepcache is not None:
        loaded = getattr(tgate, arch.reference_loader)(ref_pipe, **arch.deepcache)
    else:
        loaded = getattr(tgate, arch.reference_loader)(ref_pipe)
    extra = {} if arch.cfg else {"lcm": True}

    def call(kwargs: dict):
        return loaded.tgate(
            gate_step=settings["gate_step"],
            sp_interval=settings["sp_interval"],
            warm_up=settings["warm_up"],
            **extra,
            **kwargs,
        )

    return call


def reference_available() -> bool:
    try:
        import tgate  # noqa: F401
    except Exception:
        return False
    return True


def measure_latency(
    arch: Architecture,
    *,
    resolution: int,
    steps: int,
    gate_step: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    tgate_kwargs: dict,
    include_reference: bool = True,
    include_compiled: bool = False,
    on_call: Callable[[str], None] | None = None,
) -> LatencyResult:
    """Time ``repeats`` calls of each variant, alternating, after one untimed warm-up call each."""
    from .. import api

    denoiser = arch.build_denoiser("cpu", dtype).to(device)
    pipe = build_timing_pipeline(arch, denoiser)
    kwargs = pipeline_call_kwargs(arch, resolution, steps, device, dtype)
    settings = dict(tgate_kwargs, gate_step=gate_step)

    def plain(call_kwargs):
        return pipe(**call_kwargs)

    # Switching T-GATE on and off walks the denoiser's modules: done outside the timed call.
    def switcher(kernels: str) -> Callable[[bool], None]:
        def switch(on: bool) -> None:
            if on:
                api.enable(pipe, **dict(settings, kernels=kernels))
            else:
                api.disable(pipe)

        return switch

    runners: dict[str, Callable[[dict], object]] = {BASELINE: plain, TGATE_EAGER: plain, TGATE: plain}
    switches: dict[str, Callable[[bool], None]] = {
        BASELINE: lambda on: None,
        TGATE_EAGER: switcher("off"),
        TGATE: switcher("auto"),
    }
    timings = {name: VariantTiming(name) for name in runners}
    if include_compiled:
        timings[TGATE_COMPILED] = VariantTiming(TGATE_COMPILED)
        compiled_pipe = build_timing_pipeline(arch, copy.deepcopy(denoiser))
        compiled_settings = dict(settings, kernels="auto")

        def compiled(call_kwargs):
            return compiled_pipe(**call_kwargs)

        def keep_enabled(on: bool) -> None:
            # enabled once and compiled once: re-enabling would only update the settings
            if on:
                api.enable(compiled_pipe, **compiled_settings)

        api.enable(compiled_pipe, **compiled_settings)
        getattr(compiled_pipe, arch.denoiser_attribute).compile()
        runners[TGATE_COMPILED] = compiled
        switches[TGATE_COMPILED] = keep_enabled
    if include_reference:
        timings[REFERENCE] = VariantTiming(REFERENCE)
        try:
            ref_pipe = build_timing_pipeline(arch, copy.deepcopy(denoiser))
            runners[REFERENCE] = reference_caller(arch, ref_pipe, settings)
            switches[REFERENCE] = lambda on: None
        except Exception as error:  # the reference is optional: report why it did not run
            timings[REFERENCE].error = f"{type(error).__name__}: {error}"

    def fresh_kwargs():
        return dict(kwargs, generator=torch.Generator("cpu").manual_seed(0))

    # The warm-up only has to create kernels and grow the allocator: two steps, gate at the
    # first, go through every code path the timed calls take.
    warm_up_steps = min(steps, 2)
    warm_up_kwargs = dict(kwargs, num_inference_steps=warm_up_steps)
    full_gate = settings["gate_step"]
    settings["gate_step"] = min(full_gate, warm_up_steps - 1)
    for name, run in list(runners.items()):
        try:
            switches[name](True)
            try:
                # the compiled variant's warm-up is a whole timed-size call: it compiles a graph
                # for every phase of the schedule, so the timed calls compile nothing
                run(dict(kwargs if name == TGATE_COMPILED else warm_up_kwargs,
                         generator=torch.Generator("cpu").manual_seed(0)))
            finally:
                switches[name](False)
        except Exception as error:
            timings[name].error = f"{type(error).__name__}: {error}"
            if name == BASELINE:
                raise
            runners.pop(name)
        if on_call is not None:
            on_call(f"warm-up {name}")

    settings["gate_step"] = full_gate
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(repeats):
        for name, run in runners.items():
            call_kwargs = fresh_kwargs()
            switches[name](True)
            try:
                with torch.no_grad(), PeakMemory(device) as peak:
                    synchronize()
                    start = time.perf_counter()
                    run(call_kwargs)
                    synchronize()
                    elapsed = time.perf_counter() - start
            finally:
                switches[name](False)
            timings[name].seconds.append(elapsed)
            timings[name].peak_memory_bytes.append(peak.bytes)
            if on_call is not None:
                on_call(name)
    return LatencyResult(
        model=arch.name,
        resolution=resolution,
        steps=steps,
        gate_step=gate_step,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        repeats=repeats,
        memory_measure=PeakMemory(device).description,
        variants=timings,
    )
