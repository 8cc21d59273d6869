"""Latency and peak memory of a generation: plain pipeline, T-GATE, and the reference ``tgate``.

What is timed: one ordinary pipeline call, ``pipe(prompt_embeds=..., output_type="latent")``, of
the real pipeline class around the real-architecture denoiser (random weights): input checks,
scheduler, the whole denoising loop with the pipeline's own guidance arithmetic, and every hook
T-GATE adds. Text encoding and VAE decoding are left out (the prompt embeddings are given, the
latents returned): T-GATE does not touch them and they would only dilute the ratio by a
constant. Variants are measured alternately (baseline, T-GATE, reference, baseline, ...), so
drifts of the machine hit them alike; the median of the repeats is reported.

T-GATE is timed as ``tgate-eager`` (``kernels="off"``: plain PyTorch, the reference's exact
arithmetic), ``tgate`` (``kernels="auto"``: the fused block fast path after the gate) and, when asked,
``tgate-compiled`` (``enable(pipe, compile=True)``: compiled in its first, untimed call, whose
duration and memory are reported as what compiling costs), next to ``baseline-compiled``, the
plain denoiser compiled the same way (``torch.compile`` with the same backend and inductor
settings), which is what compiled T-GATE has to beat.

The reference package replaces the forward of every attention module it runs on and leaves it
replaced, so it gets its own pipeline over a copy of the denoiser.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ...config import CompileOptions, TgateConfig
from .architectures import Architecture
from .memory import PeakMemory
from .pipelines import build_timing_pipeline, pipeline_call_kwargs

BASELINE, BASELINE_COMPILED, TGATE_EAGER, TGATE, TGATE_COMPILED, REFERENCE = (
    "baseline", "baseline-compiled", "tgate-eager", "tgate", "tgate-compiled", "reference"
)
BASELINES = (BASELINE, BASELINE_COMPILED)
TGATE_VARIANTS = (TGATE_EAGER, TGATE, TGATE_COMPILED)


@dataclass
class VariantTiming:
    variant: str
    seconds: list[float] = field(default_factory=list)
    peak_memory_bytes: list[int] = field(default_factory=list)
    first_call_s: float | None = None
    """The untimed first call: for the compiled variant, compiling every graph."""
    first_call_peak_memory_bytes: int | None = None
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


def reference_caller(arch: Architecture, ref_pipe, config: TgateConfig) -> Callable[[dict], object]:
    import tgate

    if arch.deepcache is not None:
        loaded = getattr(tgate, arch.reference_loader)(ref_pipe, **arch.deepcache)
    else:
        loaded = getattr(tgate, arch.reference_loader)(ref_pipe)
    extra = {} if arch.cfg else {"lcm": True}

    def call(kwargs: dict):
        return loaded.tgate(
            gate_step=config.gate_step,
            sp_interval=config.sp_interval,
            warm_up=config.warm_up,
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


@dataclass
class _Variant:
    """How to run one variant: ``run(kwargs)``, with ``on()``/``off()`` around each call (outside
    the timed region: switching T-GATE walks the denoiser's modules)."""

    run: Callable[[dict], object]
    on: Callable[[], None] = lambda: None
    off: Callable[[], None] = lambda: None


def _variants(arch: Architecture, denoiser: torch.nn.Module, names, config: TgateConfig, compile_option) -> dict[str, _Variant]:
    from ... import api

    pipe = build_timing_pipeline(arch, denoiser)
    variants: dict[str, _Variant] = {}
    for name in names:
        if name == BASELINE:
            variants[name] = _Variant(lambda kwargs: pipe(**kwargs))
        elif name in (TGATE_EAGER, TGATE):
            kernels = "off" if name == TGATE_EAGER else "auto"
            variants[name] = _Variant(
                lambda kwargs: pipe(**kwargs),
                on=lambda kernels=kernels: api.enable(pipe, config=replace(config, kernels=kernels)),
                off=lambda: api.disable(pipe),
            )
        elif name == TGATE_COMPILED:
            # its own copy of the denoiser, enabled and compiled once: no other variant touches
            # its graphs
            compiled_pipe = build_timing_pipeline(arch, copy.deepcopy(denoiser))
            api.enable(compiled_pipe, config=replace(config, compile=compile_option))
            variants[name] = _Variant(lambda kwargs: compiled_pipe(**kwargs))
        elif name == BASELINE_COMPILED:
            variants[name] = _compiled_baseline(arch, copy.deepcopy(denoiser), compile_option)
        elif name == REFERENCE:
            # the reference leaves every attention forward patched: its own copy too
            variants[name] = _Variant(reference_caller(arch, build_timing_pipeline(arch, copy.deepcopy(denoiser)), config))
    return variants


def _compiled_baseline(arch: Architecture, denoiser: torch.nn.Module, compile_option) -> _Variant:
    """The plain pipeline with its denoiser compiled as ``enable(pipe, compile=compile_option)`` would."""
    from ... import _compat
    from ...engine.compilation import compile_arguments

    compile_kwargs, inductor = compile_arguments(CompileOptions.from_option(compile_option or True))
    pipe = build_timing_pipeline(arch, denoiser)
    denoiser.forward = torch.compile(denoiser.forward, **compile_kwargs)

    def run(kwargs: dict):
        with _compat.inductor_settings(inductor):
            return pipe(**kwargs)

    return _Variant(run)


def measure_latency(
    arch: Architecture,
    *,
    resolution: int,
    steps: int,
    gate_step: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    tgate_config: TgateConfig,
    variants: tuple[str, ...] = (BASELINE, TGATE_EAGER, TGATE),
    compile_option: bool | dict = True,
    on_call: Callable[[str], None] | None = None,
) -> LatencyResult:
    """Time ``repeats`` calls of each of ``variants``, interleaved, after one untimed first call
    each (a full call: the compiled variant compiles its graphs there)."""
    denoiser = arch.build_denoiser("cpu", dtype).to(device)
    kwargs = pipeline_call_kwargs(arch, resolution, steps, device, dtype)
    config = replace(tgate_config, gate_step=gate_step)
    timings = {name: VariantTiming(name) for name in variants}
    runners: dict[str, _Variant] = {}
    for name in variants:
        try:
            runners.update(_variants(arch, denoiser, (name,), config, compile_option))
        except Exception as error:  # an optional variant (the reference) reports why it did not run
            if name == BASELINE:
                raise
            timings[name].error = f"{type(error).__name__}: {error}"

    def fresh_kwargs():
        return dict(kwargs, generator=torch.Generator("cpu").manual_seed(0))

    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(variant: _Variant) -> tuple[float, int]:
        call_kwargs = fresh_kwargs()
        variant.on()
        try:
            with torch.no_grad(), PeakMemory(device) as peak:
                synchronize()
                start = time.perf_counter()
                variant.run(call_kwargs)
                synchronize()
                elapsed = time.perf_counter() - start
        finally:
            variant.off()
        return elapsed, peak.bytes

    for name, variant in list(runners.items()):
        try:
            timings[name].first_call_s, timings[name].first_call_peak_memory_bytes = timed(variant)
        except Exception as error:
            timings[name].error = f"{type(error).__name__}: {error}"
            if name == BASELINE:
                raise
            runners.pop(name)
        if on_call is not None:
            on_call(f"first call {name}")
    for _ in range(repeats):
        for name, variant in runners.items():
            elapsed, peak = timed(variant)
            timings[name].seconds.append(elapsed)
            timings[name].peak_memory_bytes.append(peak)
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
