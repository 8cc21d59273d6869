"""The ``tgate-kernels bench`` run: MACs and params of every architecture at the published
settings, latency and peak memory of a few at a size the machine can afford, and the Python
calls per step. Returns :class:`.results.BenchResults`; :mod:`.report` formats them."""

from __future__ import annotations

import os
import platform
from dataclasses import replace, dataclass, field
from typing import Callable

import torch

from .architectures import Architecture, architecture
from .latency import BASELINE, BASELINE_COMPILED, BASELINES, REFERENCE, TGATE, TGATE_COMPILED, TGATE_EAGER, TGATE_VARIANTS, measure_latency, reference_available
from ...config import TgateConfig
from .macs import forward_breakdown, generation_macs, planned_generation_macs
from .params import denoiser_params
from .loop_latency import loop_latency
from .python_calls import measure_python_calls
from .results import BenchResults, LatencyRow, MacsRow, MacsSweepRow, PythonCallsRow, ResolutionRow, ThroughputRow

ATTENTION_SCORES_NOTE = (
    "MACs = FLOPs/2 from torch.utils.flop_counter.FlopCounterMode on the meta device, whole "
    "generation of denoiser calls. 'macs' leaves out the attention-score products (QK^T, PV of "
    "scaled_dot_product_attention): that is the convention that reproduces the published table's "
    "baselines (calflops does not see scaled_dot_product_attention). 'macs_with_attention_scores' "
    "counts them too."
)


@dataclass
class BenchOptions:
    models: list[str]
    latency_models: list[str]
    resolution: int = 256
    steps: int = 10
    gate_steps: list[int] | None = None
    repeats: int = 2
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    dtype_reason: str = ""
    """Why the latency runs in ``dtype`` (measured on this CPU, asked for, ...)."""
    reference: bool = True
    compile: bool | dict = False
    resolutions: list[int] = field(default_factory=list)
    """Sizes of the resolution sweep (baseline vs T-GATE)."""
    python_calls_model: str | None = "sd15"
    python_calls_resolution: int = 64
    throughput_model: str | None = None
    throughput_prompts: list[int] = field(default_factory=list)
    """Batches of prompts whose images per second are measured (denoiser alone)."""
    extra_manifests: tuple[str, ...] = ()

    def architecture(self, name: str) -> Architecture:
        return architecture(name, self.extra_manifests)


Progress = Callable[[str], None]


def _scaled_gate(arch: Architecture, steps: int) -> int:
    """The published gate step moved to another step count at the same fraction of the steps."""
    if steps == arch.steps:
        return arch.gate_step
    return max(1, min(steps, round(arch.gate_step * steps / arch.steps)))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _macs_rows(arch: Architecture, progress: Progress) -> tuple[list[MacsRow], list[MacsSweepRow]]:
    denoiser = arch.build_denoiser("meta")
    params = denoiser_params(denoiser)
    breakdown = forward_breakdown(arch, denoiser=denoiser)
    if arch.deepcache is not None:
        # DeepCache alone: T-GATE's gate at the very last step and self-attention computed at
        # every step change no MACs, so this is the DeepCache-only generation.
        baseline_kwargs = arch.tgate_config(gate_step=arch.steps)
        baseline = generation_macs(arch, baseline_kwargs, denoiser=denoiser)
    else:
        # Every step of the plain pipeline is the same call on the same batch.
        baseline = planned_generation_macs(breakdown, None, arch.steps, arch.cfg)
    progress(f"{arch.name}: baseline MACs")
    # T-GATE's generation runs through the very hooks a pipeline gets.
    gated = generation_macs(arch, arch.tgate_config(), denoiser=denoiser)
    progress(f"{arch.name}: T-GATE MACs")
    rows = []
    for variant, count, published in ((BASELINE, baseline, arch.published_baseline), (TGATE, gated, arch.published_tgate)):
        rows.append(
            MacsRow(
                model=arch.name,
                label=arch.label,
                variant=variant,
                steps=arch.steps,
                resolution=arch.resolution,
                gate_step=None if variant == BASELINE else arch.gate_step,
                macs=count.without_attention_scores,
                macs_with_attention_scores=count.total,
                macs_ratio=count.without_attention_scores / baseline.without_attention_scores,
                macs_ratio_with_attention_scores=count.total / baseline.total,
                params=params.total if variant == BASELINE else params.after_gate_published_convention,
                params_after_gate_with_norms=None if variant == BASELINE else params.after_gate,
                published_macs=published.macs if published else None,
                published_macs_ratio=_ratio(published.macs, arch.published_baseline.macs) if published else None,
                published_params=published.params if published else None,
            )
        )
    rows[0].per_sample_forward_macs = breakdown.total.without_attention_scores
    rows[0].per_sample_self_attention_macs = breakdown.self_attention.without_attention_scores
    rows[0].per_sample_cross_attention_macs = breakdown.cross_attention.without_attention_scores
    sweep = []
    if arch.deepcache is None:
        if arch.cfg:
            gate, steps = arch.gate_step, arch.steps
            floor = (breakdown.total - breakdown.self_attention) * (2 * gate) + (
                breakdown.total - breakdown.self_attention - breakdown.cross_attention
            ) * (steps - gate)
            rows[1].macs_floor_any_schedule = floor.without_attention_scores
            rows[1].macs_floor_any_schedule_with_attention_scores = floor.total
        plain = planned_generation_macs(breakdown, None, arch.steps, arch.cfg)
        for gate_step in range(arch.steps + 1):
            settings = arch.tgate_config(gate_step=gate_step, deepcache=False)
            planned = planned_generation_macs(breakdown, settings, arch.steps, arch.cfg)
            sweep.append(
                MacsSweepRow(
                    model=arch.name,
                    steps=arch.steps,
                    gate_step=gate_step,
                    macs_ratio=planned.without_attention_scores / plain.without_attention_scores,
                    macs_ratio_with_attention_scores=planned.total / plain.total,
                )
            )
    return rows, sweep


def latency_variants(options: BenchOptions) -> tuple[str, ...]:
    """The variants the main latency run times."""
    names = [BASELINE, TGATE_EAGER, TGATE]
    if options.compile:
        names += [BASELINE_COMPILED, TGATE_COMPILED]
    if options.reference and reference_available():
        names.append(REFERENCE)
    return tuple(names)


def _predicted(arch: Architecture, resolution: int, steps: int, gate_step: int, config: TgateConfig):
    """MACs ratios T-GATE / baseline (with, and without, attention scores) at these settings."""
    breakdown = forward_breakdown(arch, resolution=resolution)
    plain = planned_generation_macs(breakdown, None, steps, arch.cfg)
    settings = replace(config, gate_step=gate_step, deepcache=None)
    gated = planned_generation_macs(breakdown, settings, steps, arch.cfg)
    return gated.total / plain.total, gated.without_attention_scores / plain.without_attention_scores


def _latency_rows(arch: Architecture, options: BenchOptions, progress: Progress) -> list[LatencyRow]:
    rows = []
    config = arch.tgate_config()
    for gate_step in options.gate_steps or [_scaled_gate(arch, options.steps)]:
        result = measure_latency(
            arch,
            resolution=options.resolution,
            steps=options.steps,
            gate_step=gate_step,
            repeats=options.repeats,
            device=options.device,
            dtype=options.dtype,
            tgate_config=config,
            variants=latency_variants(options),
            compile_option=options.compile,
            on_call=lambda what: progress(f"{arch.name} gate {gate_step}: {what}"),
        )
        predicted = _predicted(arch, options.resolution, options.steps, gate_step, config)[0]
        for name, timing in result.variants.items():
            gated = name not in BASELINES
            rows.append(
                LatencyRow(
                    model=arch.name,
                    label=arch.label,
                    variant=name,
                    resolution=result.resolution,
                    steps=result.steps,
                    gate_step=gate_step if gated else None,
                    device=result.device,
                    dtype=result.dtype,
                    repeats=result.repeats,
                    seconds=timing.seconds,
                    median_s=timing.median_s,
                    latency_ratio=result.ratio(name),
                    latency_ratio_vs_reference=result.ratio(name, REFERENCE) if name in TGATE_VARIANTS else None,
                    macs_ratio=predicted if gated else 1.0,
                    peak_memory_mb=_mb(timing.median_peak_memory_bytes),
                    memory_measure=result.memory_measure,
                    first_call_s=timing.first_call_s,
                    first_call_peak_memory_mb=_mb(timing.first_call_peak_memory_bytes),
                    error=timing.error,
                )
            )
    return rows


def _mb(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def _resolution_rows(arch: Architecture, options: BenchOptions, progress: Progress, main: list[LatencyRow]) -> list[ResolutionRow]:
    """Baseline vs T-GATE at each size of the sweep (the main run's numbers at its own size)."""
    rows = []
    config = arch.tgate_config()
    gate_step = _scaled_gate(arch, options.steps)
    for resolution in options.resolutions:
        measured = {r.variant: r.median_s for r in main if r.resolution == resolution and r.gate_step in (None, gate_step)}
        if not {BASELINE, TGATE} <= set(measured):
            result = measure_latency(
                arch, resolution=resolution, steps=options.steps, gate_step=gate_step, repeats=options.repeats,
                device=options.device, dtype=options.dtype, tgate_config=config, variants=(BASELINE, TGATE),
                on_call=lambda what: progress(f"{arch.name} {resolution}px: {what}"),
            )
            measured = {name: timing.median_s for name, timing in result.variants.items()}
        with_scores, without_scores = _predicted(arch, resolution, options.steps, gate_step, config)
        rows.append(
            ResolutionRow(
                model=arch.name,
                resolution=resolution,
                steps=options.steps,
                gate_step=gate_step,
                device=options.device,
                dtype=str(options.dtype).replace("torch.", ""),
                baseline_s=measured.get(BASELINE),
                tgate_s=measured.get(TGATE),
                latency_ratio=_ratio(measured.get(TGATE), measured.get(BASELINE)),
                macs_ratio=with_scores,
                macs_ratio_without_attention_scores=without_scores,
            )
        )
    return rows


def _python_calls_rows(options: BenchOptions) -> list[PythonCallsRow]:
    arch = options.architecture(options.python_calls_model)
    counts = measure_python_calls(
        arch,
        resolution=options.python_calls_resolution,
        steps=arch.steps,
        gate_step=arch.gate_step,
        tgate_config=arch.tgate_config(),
        include_reference=options.reference and reference_available(),
    )
    base = counts[BASELINE].per_step
    return [
        PythonCallsRow(
            model=arch.name,
            variant=name,
            steps=count.steps,
            gate_step=None if name == BASELINE else arch.gate_step,
            resolution=options.python_calls_resolution,
            python_calls=count.calls,
            calls_per_step=count.per_step,
            added_calls_per_step=count.per_step - base,
        )
        for name, count in counts.items()
    ]


def _throughput_rows(options: BenchOptions, progress: Progress) -> list[ThroughputRow]:
    arch = options.architecture(options.throughput_model)
    gate_step = _scaled_gate(arch, options.steps)
    predicted = _predicted(arch, options.resolution, options.steps, gate_step, arch.tgate_config())[0]
    denoiser = arch.build_denoiser(options.device, options.dtype)
    rows = []
    for prompts in options.throughput_prompts:
        timed = loop_latency(
            arch, options.device, options.dtype, rounds=options.repeats, resolution=options.resolution, prompts=prompts,
            steps=options.steps, gate_step=gate_step, denoiser=denoiser,
        )
        rows.append(ThroughputRow(
            model=arch.name, label=arch.label, prompts=prompts, resolution=timed.resolution, steps=timed.steps,
            gate_step=timed.gate_step, device=str(options.device), dtype=str(options.dtype).replace("torch.", ""),
            rounds=timed.rounds, baseline_images_per_s=timed.baseline_images_per_s,
            tgate_images_per_s=timed.tgate_images_per_s, latency_ratio=timed.ratio, macs_ratio=predicted,
        ))
        progress(f"{arch.name}: throughput at {prompts} prompts")
    return rows


def environment(options: BenchOptions) -> dict:
    import diffusers

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=options.device,
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        reference_tgate=reference_available(),
    )


def planned_work(options: BenchOptions) -> int:
    """Progress-bar ticks the run will make."""
    macs = 2 * len(options.models)
    calls = (options.repeats + 1) * len(latency_variants(options))
    latency = len(options.latency_models) * len(options.gate_steps or [0]) * calls
    sweep_runs = [r for r in options.resolutions if r != options.resolution or options.gate_steps]
    sweep = len(options.latency_models) * len(sweep_runs) * (options.repeats + 1) * 2
    throughput = len(options.throughput_prompts) if options.throughput_model else 0
    return macs + latency + sweep + (1 if options.python_calls_model else 0) + throughput


def run_bench(options: BenchOptions, progress: Progress = lambda _: None) -> BenchResults:
    results = BenchResults(
        environment=environment(options),
        settings=dict(
            models=options.models,
            latency_models=options.latency_models,
            resolution=options.resolution,
            steps=options.steps,
            gate_steps=options.gate_steps,
            repeats=options.repeats,
            device=options.device,
            dtype=str(options.dtype).replace("torch.", ""),
            dtype_reason=options.dtype_reason,
            reference=options.reference,
            compile=options.compile,
            resolutions=options.resolutions,
            python_calls_model=options.python_calls_model,
            throughput_model=options.throughput_model,
            throughput_prompts=options.throughput_prompts,
            extra_manifests=list(options.extra_manifests),
        ),
        macs_convention=ATTENTION_SCORES_NOTE,
        latency_scope=(
            "one pipe(prompt_embeds=..., output_type='latent') call of the real pipeline class around the "
            "random-weight denoiser: scheduler and denoising loop; text encoding and VAE decoding left out"
        ),
    )
    for name in options.models:
        rows, sweep = _macs_rows(options.architecture(name), progress)
        results.macs += rows
        results.macs_sweep += sweep
    for name in options.latency_models:
        arch = options.architecture(name)
        main = _latency_rows(arch, options, progress)
        results.latency += main
        results.resolutions += _resolution_rows(arch, options, progress, main)
    if options.python_calls_model:
        results.python_calls = _python_calls_rows(options)
        progress(f"{options.python_calls_model}: Python calls per step")
    if options.throughput_model and options.throughput_prompts:
        results.throughput = _throughput_rows(options, progress)
    if options.dtype_reason and (results.latency or results.throughput):
        results.notes.append(f"latency dtype: {options.dtype_reason}")
    return results
