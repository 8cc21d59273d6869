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
    """Seconds per generation of ``prompts`` images by the denoiser alone (medians over ``rounds``)."""

    label: str
    prompts: int
    resolution: int
    steps: int
    gate_step: int
    baseline_s: float
    tgate_s: float
    rounds: int

    @property
    def ratio(self) -> float:
        return self.tgate_s / self.baseline_s

    @property
    def baseline_images_per_s(self) -> float:
        return self.prompts / self.baseline_s

    @property
    def tgate_images_per_s(self) -> float:
        return self.prompts / self.tgate_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_latency(
    arch: Architecture, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, rounds: int = 3,
    resolution: int | None = None, prompts: int = 1, steps: int | None = None, gate_step: int | None = None,
    denoiser: torch.nn.Module | None = None,
) -> LoopLatency:
    """Baseline and T-GATE generations of ``prompts`` images by ``arch``'s denoiser (built with
    random weights on ``device`` in ``dtype`` unless given), at its published setting unless
    ``steps`` and ``gate_step`` say otherwise."""
    device = torch.device(device)
    denoiser = denoiser if denoiser is not None else arch.build_denoiser(device, dtype)
    loop = DenoisingLoop(arch, denoiser, arch.cfg)
    config = arch.tgate_config(gate_step, deepcache=False)
    steps = steps or arch.steps

    def generation(gated: bool) -> float:
        if gated:
            api.enable(loop, config=config)
        try:
            _synchronize(device)
            start = time.perf_counter()
            loop.run(steps, resolution, device=device, dtype=dtype, prompts=prompts)
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
        arch.label, prompts, resolution or arch.resolution, steps, config.gate_step,
        statistics.median(times[False]), statistics.median(times[True]), rounds,
    )
