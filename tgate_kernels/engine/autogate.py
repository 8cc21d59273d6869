"""Choosing the gate of one generation from its cross-attention outputs (``gate_step="auto"``).

T-GATE's premise is that cross-attention converges early. ``"auto"`` watches it converge: at
every step before the gate, each cross-attention output is compared with its own output at the
previous step, ``||A_t - A_{t-1}|| / ||A_{t-1}||`` per sample, and these relative changes are
accumulated on the device, so no layer waits for the host. Once per step, when the progress bar
moves, one number crosses to the host: the mean over the layers of the slowest sample of the
batch (the last sample to converge decides for the batch). The gate falls after the first step of
the window ``[min_fraction, max_fraction]`` of the steps at which that number has stayed below
``threshold`` for ``patience`` steps, and at ``max_fraction`` at the latest.

Every step of the window runs as a gate step would (both attentions computed and cached as the
mean over the text pair), so that the steps after the chosen gate see exactly what a fixed gate
there would have given them.
"""

from __future__ import annotations

import torch

from ..config import AutoGate
from ..schedule import candidate_plan
from .generation import GenerationState, StepListener

_TINY = torch.finfo(torch.float32).tiny


class GateChooser:
    """The gate of one generation, chosen from its cross-attention outputs (see the module)."""

    def __init__(self, options: AutoGate, num_steps: int) -> None:
        self.options = options
        self.earliest, self.latest = options.window(num_steps)
        self.chosen: int | None = None
        self.history: list[float] = []
        """The relative change of each step's cross-attention outputs (the slowest sample's)."""
        self._previous: dict = {}
        self._sums: dict = {}
        self._counts: dict = {}
        self._below = 0

    def observe(self, key, parts: tuple[str, ...], output: torch.Tensor) -> None:
        """One cross-attention output of this step (``key``: the module and the call's parts)."""
        flat = output.detach().flatten(1)
        # its norm is the next step's denominator: computed once, kept with the output
        norm = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
        previous = self._previous.get(key)
        self._previous[key] = (flat, norm)
        if previous is None or previous[0].shape != flat.shape:
            return
        before, scale = previous
        ratio = torch.linalg.vector_norm(flat - before, dim=1, dtype=torch.float32).div_(scale.clamp_min(_TINY))
        total = self._sums.get(parts)
        if total is None:
            self._sums[parts] = ratio
        else:
            total.add_(ratio)
        self._counts[parts] = self._counts.get(parts, 0) + 1

    def step_done(self, step: int) -> int | None:
        """Close ``step``; the gate, if it is chosen now (it applies from the next step)."""
        if self.chosen is not None:
            return self.chosen
        if self._sums:
            change = max(float((total / self._counts[parts]).max()) for parts, total in self._sums.items())
            self.history.append(change)
            self._below = self._below + 1 if change < self.options.threshold else 0
        self._sums, self._counts = {}, {}
        gate = step + 1
        if gate >= self.latest or (gate >= self.earliest and self._below >= self.options.patience):
            self.chosen = min(gate, self.latest)
            self._previous = {}
        return self.chosen

    def in_window(self, step: int) -> bool:
        """Whether ``step`` runs as a possible last step before the gate."""
        return self.chosen is None and step >= self.earliest - 1


class AutoGateListener(StepListener):
    """Chooses the gate of each ``gate_step="auto"`` generation of its pipeline: every step of the
    window runs as a candidate gate step until the gate is chosen, from the next step on."""

    def __init__(self) -> None:
        self.chooser: GateChooser | None = None

    def generation_started(self, state: GenerationState) -> None:
        if state.config.auto:
            self.chooser = GateChooser(state.config.auto_gate_options, state.num_steps)
            state.context.observer = self._observe

    def _observe(self, key, parts: tuple[str, ...], output: torch.Tensor) -> None:
        if self.chooser is not None and self.chooser.chosen is None:
            self.chooser.observe(key, parts, output)

    def step_started(self, state: GenerationState) -> None:
        chooser = self.chooser
        if chooser is not None and chooser.in_window(state.step):
            state.plan = candidate_plan(state.step)

    def step_ended(self, state: GenerationState) -> None:
        chooser = self.chooser
        if chooser is not None:
            state.gate_step = chooser.step_done(state.step) or state.gate_step
            state.gate_history = tuple(chooser.history)

    def generation_ended(self, state: GenerationState) -> None:
        # the outputs it compared go with the generation
        self.chooser = None
        state.context.observer = None
