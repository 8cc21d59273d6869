"""Timing a denoiser's whole generation without its pipeline: baseline against T-GATE.

For the architectures whose full pipelines are too large to build with random weights here
(SD3.5 Large, FLUX.1-dev, Qwen-Image), what a step costs is the denoiser's:
:class:`~.denoising_loop.DenoisingLoop` runs it on the latents and text states its pipeline
would pass, for the architecture's steps, and T-GATE is enabled on the loop as on a pipeline.
Variants are interleaved round by round, after one untimed generation of each.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ... import api
from .architectures import Architecture
from .denoising_loop import DenoisingLoop


@dataclass(frozen=True)
class LoopLatency:
    """Seconds per generation of the denoiser alone (medians over ``rounds``)."""

    label: str
    resolution: int
    steps: int
    gate_step: int
    baseline_s: float
    tgate_s: float
    rounds: int

    @property
    def ratio(self) -> float:
        return self.tgate_s / self.baseline_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_latency(
    arch: Architecture, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, rounds: int = 3,
    resolution: int | None = None,
) -> LoopLatency:
    """Baseline and T-GATE (the architecture's published setting) generations of ``arch``'s
    denoiser, built with random weights on ``device`` in ``dtype``."""
    device = torch.device(device)
    loop = DenoisingLoop(arch, arch.build_denoiser(device, dtype), arch.cfg)
    config = arch.tgate_config()

    def generation(gated: bool) -> float:
        if gated:
            api.enable(loop, config=config)
        try:
            _synchronize(device)
            start = time.perf_counter()
            loop.run(arch.steps, resolution, device=device, dtype=dtype)
            _synchronize(device)
            return time.perf_counter() - start
        finally:
            if gated:
                api.disable(loop)

    generation(False), generation(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for gated in (False, True):
            times[gated].append(generation(gated))
    return LoopLatency(
        arch.label, resolution or arch.resolution, arch.steps, config.gate_step,
        statistics.median(times[False]), statistics.median(times[True]), rounds,
    )
