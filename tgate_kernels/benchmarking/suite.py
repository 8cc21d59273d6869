"""The ``tgate-kernels bench`` run: MACs and params of every architecture at the seed document's
settings, latency and peak memory of a few at a size the machine can afford, and the Python
bookkeeping per step. Returns plain data; :mod:`.report` formats it."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..schedule import TgateSettings
from .architectures import Architecture, architecture
from .bookkeeping import measure_bookkeeping
from .latency import BASELINE, REFERENCE, TGATE, TGATE_VARIANTS, measure_latency, reference_available
from .macs import (
    enable_supports,
    forward_breakdown,
    generation_macs,
    planned_generation_macs,
    tgate_enable_kwargs,
)
from .params import denoiser_params

ATTENTION_SCORES_NOTE = (
    "MACs = FLOPs/2 from torch.utils.flop_counter.FlopCounterMode on the meta device, whole "
    "generation of denoiser calls. 'macs' leaves out the attention-score products (QK^T, PV of "
    "scaled_dot_product_attention): that is the convention that reproduces the seed table's "
    "baselines (calflops does not see scaled_dot_product_attention). 'macs_with_attention_scores' "
    "counts them too."
)


@dataclass
class BenchOptions:
    models: list[str]
    latency_models: list[str]
    resolution: int = 128
    steps: int = 10
    gate_steps: list[int] | None = None
    repeats: int = 2
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    reference: bool = True
    compile: bool = False
    bookkeeping_model: str | None = "sd15"
    bookkeeping_resolution: int = 64
    extra_enable_kwargs: dict = field(default_factory=dict)


Progress = Callable[[str], None]


def _scaled_gate(arch: Architecture, steps: int) -> int:
    """The seed's gate step moved to another step count at the same fraction of the steps."""
    if steps == arch.steps:
        return arch.gate_step
    return max(1, min(steps, round(arch.gate_step * steps / arch.steps)))


def _macs_fields(prefix: str, count) -> dict:
    return {f"{prefix}": count.without_attention_scores, f"{prefix}_with_attention_scores": count.total}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _macs_rows(arch: Architecture, progress: Progress, extra_enable_kwargs: dict) -> tuple[list[dict], list[dict], list[str]]:
    notes: list[str] = []
    denoiser = arch.build_denoiser("meta")
    params = denoiser_params(denoiser)
    common = dict(model=arch.name, label=arch.label, steps=arch.steps, resolution=arch.resolution)
    if arch.deepcache is not None and not enable_supports("deepcache"):
        notes.append(f"{arch.label}: tgate_kernels.enable has no `deepcache=` option in this version; rows left out.")
        return [], [], notes

    breakdown = forward_breakdown(arch, denoiser=denoiser)
    if arch.deepcache is not None:
        # DeepCache alone: T-GATE's gate at the very last step and self-attention computed at
        # every step change no MACs, so this is the DeepCache-only generation.
        baseline_kwargs = tgate_enable_kwargs(arch, gate_step=arch.steps, **extra_enable_kwargs)
        baseline = generation_macs(arch, baseline_kwargs, denoiser=denoiser)
    else:
        # Every step of the plain pipeline is the same call on the same batch.
        baseline = planned_generation_macs(breakdown, None, arch.steps, arch.cfg)
    progress(f"{arch.name}: baseline MACs")
    # T-GATE's generation runs through the very hooks a pipeline gets.
    gated = generation_macs(arch, tgate_enable_kwargs(arch, **extra_enable_kwargs), denoiser=denoiser)
    progress(f"{arch.name}: T-GATE MACs")
    rows = []
    for variant, count, seed in (
        (BASELINE, baseline, arch.seed_baseline),
        (TGATE, gated, arch.seed_tgate),
    ):
        row = dict(common, variant=variant, gate_step=None if variant == BASELINE else arch.gate_step)
        row.update(_macs_fields("macs", count))
        row["macs_ratio"] = count.without_attention_scores / baseline.without_attention_scores
        row["macs_ratio_with_attention_scores"] = count.total / baseline.total
        row["seed_macs"] = seed.macs if seed else None
        row["seed_macs_ratio"] = _ratio(seed.macs, arch.seed_baseline.macs) if seed else None
        row["params"] = params.total if variant == BASELINE else params.after_gate_seed_convention
        row["params_after_gate_with_norms"] = None if variant == BASELINE else params.after_gate
        row["seed_params"] = seed.params if seed else None
        rows.append(row)

    if arch.deepcache is None and arch.cfg:
        # The fewest MACs any schedule can reach at this gate: self-attention skipped at every
        # step, cross-attention and the CFG half skipped at every step after the gate.
        gate, steps = arch.gate_step, arch.steps
        floor = (breakdown.total - breakdown.self_attention) * (2 * gate) + (
            breakdown.total - breakdown.self_attention - breakdown.cross_attention
        ) * (steps - gate)
        rows[1]["macs_floor_any_schedule"] = floor.without_attention_scores
        rows[1]["macs_floor_any_schedule_with_attention_scores"] = floor.total

    sweep = []
    if arch.deepcache is None:
        for gate_step in range(arch.steps + 1):
            settings = TgateSettings(gate_step=gate_step, sp_interval=arch.sp_interval, warm_up=arch.warm_up)
            planned = planned_generation_macs(breakdown, settings, arch.steps, arch.cfg)
            plain = planned_generation_macs(breakdown, None, arch.steps, arch.cfg)
            sweep.append(
                dict(
                    model=arch.name,
                    steps=arch.steps,
                    gate_step=gate_step,
                    macs_ratio=planned.without_attention_scores / plain.without_attention_scores,
                    macs_ratio_with_attention_scores=planned.total / plain.total,
                )
            )
    rows[0]["per_sample_forward_macs"] = breakdown.total.without_attention_scores
    rows[0]["per_sample_self_attention_macs"] = breakdown.self_attention.without_attention_scores
    rows[0]["per_sample_cross_attention_macs"] = breakdown.cross_attention.without_attention_scores
    return rows, sweep, notes


def _latency_rows(arch: Architecture, options: BenchOptions, progress: Progress) -> list[dict]:
    rows = []
    gate_steps = options.gate_steps or [_scaled_gate(arch, options.steps)]
    include_reference = options.reference and reference_available()
    for gate_step in gate_steps:
        result = measure_latency(
            arch,
            resolution=options.resolution,
            steps=options.steps,
            gate_step=gate_step,
            repeats=options.repeats,
            device=options.device,
            dtype=options.dtype,
            tgate_kwargs=tgate_enable_kwargs(arch, **options.extra_enable_kwargs),
            include_reference=include_reference,
            include_compiled=options.compile,
            on_call=lambda what: progress(f"{arch.name} gate {gate_step}: {what}"),
        )
        for name, timing in result.variants.items():
            rows.append(
                dict(
                    model=arch.name,
                    label=arch.label,
                    variant=name,
                    resolution=result.resolution,
                    steps=result.steps,
                    gate_step=None if name == BASELINE else gate_step,
                    device=result.device,
                    dtype=result.dtype,
                    repeats=result.repeats,
                    seconds=timing.seconds,
                    median_s=timing.median_s,
                    latency_ratio=result.ratio(name),
                    latency_ratio_vs_reference=result.ratio(name, REFERENCE) if name in TGATE_VARIANTS else None,
                    peak_memory_mb=None if timing.median_peak_memory_bytes is None else timing.median_peak_memory_bytes / 2**20,
                    memory_measure=result.memory_measure,
                    error=timing.error,
                )
            )
    return rows


def environment(options: BenchOptions) -> dict:
    import diffusers

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        cpu_count=__import__("os").cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=options.device,
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        reference_tgate=reference_available(),
    )


def planned_work(options: BenchOptions) -> int:
    """Progress-bar ticks the run will make."""
    macs = sum(2 if not architecture(m).deepcache or enable_supports("deepcache") else 0 for m in options.models)
    calls = (options.repeats + 1) * (3 if options.reference and reference_available() else 2)
    latency = len(options.latency_models) * len(options.gate_steps or [0]) * calls
    return macs + latency + (1 if options.bookkeeping_model else 0)


def run_bench(options: BenchOptions, progress: Progress = lambda _: None) -> dict:
    macs_rows: list[dict] = []
    sweep_rows: list[dict] = []
    notes: list[str] = []
    for name in options.models:
        rows, sweep, model_notes = _macs_rows(architecture(name), progress, options.extra_enable_kwargs)
        macs_rows += rows
        sweep_rows += sweep
        notes += model_notes

    latency_rows: list[dict] = []
    for name in options.latency_models:
        latency_rows += _latency_rows(architecture(name), options, progress)

    bookkeeping_rows: list[dict] = []
    if options.bookkeeping_model:
        arch = architecture(options.bookkeeping_model)
        counts = measure_bookkeeping(
            arch,
            resolution=options.bookkeeping_resolution,
            steps=arch.steps,
            gate_step=arch.gate_step,
            tgate_kwargs=tgate_enable_kwargs(arch, **options.extra_enable_kwargs),
            include_reference=options.reference and reference_available(),
        )
        base = counts[BASELINE].per_step
        for name, count in counts.items():
            bookkeeping_rows.append(
                dict(
                    model=arch.name,
                    variant=name,
                    steps=count.steps,
                    gate_step=None if name == BASELINE else arch.gate_step,
                    resolution=options.bookkeeping_resolution,
                    python_calls=count.calls,
                    calls_per_step=count.per_step,
                    added_calls_per_step=count.per_step - base,
                )
            )
        progress(f"{arch.name}: Python calls per step")

    return dict(
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
            reference=options.reference,
            compile=options.compile,
            bookkeeping_model=options.bookkeeping_model,
        ),
        macs_convention=ATTENTION_SCORES_NOTE,
        latency_scope=(
            "one pipe(prompt_embeds=..., output_type='latent') call of the real pipeline class around the "
            "random-weight denoiser: scheduler and denoising loop; text encoding and VAE decoding left out"
        ),
        macs=macs_rows,
        macs_sweep=sweep_rows,
        latency=latency_rows,
        bookkeeping=bookkeeping_rows,
        notes=notes,
    )
