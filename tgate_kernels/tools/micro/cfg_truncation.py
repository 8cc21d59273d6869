"""CFG truncation: classifier-free guidance dropped from one step on, nothing cached.

The baseline T-GATE has to beat at equal cost (Adaptive Guidance's idea; diffusers' CFG cut-off
callbacks). From the cut-off step on, each denoiser call of a batched ``[negative, prompt]``
pipeline runs on the prompt half alone and gives its prediction for both halves, so the
pipeline's ``uncond + s * (cond - uncond)`` is the conditional prediction. diffusers'
``SDCFGCutoffCallback`` does the same for Stable Diffusion but keeps one row of the prompt
embeddings (wrong for a batch of prompts), and PixArt's pipelines take no step-end callback; a
wrapper of the denoiser's forward serves both. A true-CFG pipeline (FLUX's: the prompt's call,
then the negative prompt's, each step) gets the prompt call's prediction back for the negative
prompt's call, which does not run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class CFGTruncation:
    """Installed on ``denoiser`` with ``with CFGTruncation(denoiser, cutoff_step) as truncation``;
    :meth:`new_generation` before each pipeline call restarts its step count (one denoiser call
    a step, or two with ``separate_calls``: the prompt's first)."""

    def __init__(self, denoiser: torch.nn.Module, cutoff_step: int, *, separate_calls: bool = False) -> None:
        self.denoiser = denoiser
        self.cutoff_step = cutoff_step
        self.separate_calls = separate_calls
        self.calls = 0
        self._forward = None
        self._prompt_output = None

    def new_generation(self) -> None:
        self.calls = 0

    def __enter__(self) -> CFGTruncation:
        self._forward = self.denoiser.forward
        self.denoiser.forward = self._truncated
        return self

    def __exit__(self, *exc) -> None:
        del self.denoiser.forward  # the instance attribute: the class's forward is back

    def _truncated(self, *args, **kwargs):
        call, self.calls = self.calls, self.calls + 1
        if self.separate_calls:
            step, negative = divmod(call, 2)
            if negative and step >= self.cutoff_step:
                return self._prompt_output
            output = self._forward(*args, **kwargs)
            if not negative:
                self._prompt_output = output
            return output
        if call < self.cutoff_step:
            return self._forward(*args, **kwargs)
        sample = args[0] if args else kwargs["hidden_states" if "hidden_states" in kwargs else "sample"]
        rows = sample.shape[0]
        if rows % 2:
            raise RuntimeError(f"CFG truncation expects a [negative, prompt] batch; the denoiser got {rows} rows")

        def prompt_half(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                return value[rows // 2:]
            if isinstance(value, dict):
                return {key: prompt_half(item) for key, item in value.items()}
            return value

        output = self._forward(*map(prompt_half, args), **{key: prompt_half(value) for key, value in kwargs.items()})
        return _both_halves(output)


def _both_halves(output: Any) -> Any:
    """The denoiser's output on the prompt half, given for both halves."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, tuple):
        return tuple(_both_halves(item) for item in output)
    if dataclasses.is_dataclass(output):
        return type(output)(**{field.name: _both_halves(getattr(output, field.name)) for field in dataclasses.fields(output)})
    return output
