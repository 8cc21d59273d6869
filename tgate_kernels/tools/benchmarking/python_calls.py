"""The Python bookkeeping an accelerator adds to a pipeline: function calls per denoising step.

Every Python function call (``sys.setprofile`` "call" events, C functions excluded) made during
one whole generation is counted, and divided by the number of steps. The difference to the plain
pipeline is what the accelerator adds per step: the reference ``tgate`` package re-patches every
attention module and inspects each processor's signature at every step; T-GATE's hooks add a
few calls per attention module.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class CallCount:
    variant: str
    calls: int
    steps: int

    @property
    def per_step(self) -> float:
        return self.calls / self.steps


def count_python_calls(work: Callable[[], object]) -> int:
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(previous)
    return calls


def measure_python_calls(arch, *, resolution: int, steps: int, gate_step: int, tgate_config, include_reference: bool = True) -> dict[str, CallCount]:
    """Calls per step of one generation: plain pipeline, T-GATE, and the reference ``tgate``."""
    import copy
    import dataclasses

    import torch

    from ... import api
    from .latency import BASELINE, REFERENCE, TGATE, reference_caller
    from .pipelines import build_timing_pipeline, pipeline_call_kwargs

    denoiser = arch.build_denoiser("cpu")
    pipe = build_timing_pipeline(arch, denoiser)
    kwargs = pipeline_call_kwargs(arch, resolution, steps, "cpu", torch.float32)
    config = dataclasses.replace(tgate_config, gate_step=gate_step)
    runs: dict[str, Callable[[], object]] = {BASELINE: lambda: pipe(**kwargs)}
    if include_reference:
        reference = reference_caller(arch, build_timing_pipeline(arch, copy.deepcopy(denoiser)), config)
        runs[REFERENCE] = lambda: reference(dict(kwargs))
    counts = {}
    with torch.no_grad():
        for name, run in runs.items():
            run()  # first calls import and cache things; count a steady-state call
            counts[name] = CallCount(name, count_python_calls(run), steps)
        # Switching T-GATE on walks the denoiser's modules once; it is not per-step work.
        api.enable(pipe, config=config)
        try:
            run = runs[BASELINE]
            run()
            counts[TGATE] = CallCount(TGATE, count_python_calls(run), steps)
        finally:
            api.disable(pipe)
    order = (BASELINE, TGATE, REFERENCE)
    return {name: counts[name] for name in order if name in counts}
