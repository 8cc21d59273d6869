"""Dropping classifier-free guidance after the gate, around a denoiser.

After the gate the pipeline still builds its doubled CFG batch. This hook runs the denoiser on
one half of every CFG-batched input (sample, text states, batched timesteps, masks,
``added_cond_kwargs``, ControlNet residuals, ...) and returns the prediction twice, so the
pipeline's own ``uncond + g * (cond - uncond)`` collapses to that prediction exactly. No copy of
any pipeline's ``__call__`` is needed.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput

from ..state import GenerationState

HOOK_NAME = "tgate_cfg_batch"

_SAMPLE_NAMES = ("sample", "hidden_states")


def _sample_batch(args: tuple, kwargs: dict) -> int | None:
    sample = args[0] if args else next((kwargs[n] for n in _SAMPLE_NAMES if n in kwargs), None)
    return sample.shape[0] if isinstance(sample, torch.Tensor) and sample.ndim > 0 else None


def _select_half(value, batch: int, second: bool):
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch:
            return value
        half = batch // 2
        return value[half:] if second else value[:half]
    if isinstance(value, (list, tuple)) and not isinstance(value, BaseOutput):
        converted = [_select_half(v, batch, second) for v in value]
        return type(value)(converted) if isinstance(value, list) else tuple(converted)
    if isinstance(value, dict) and not isinstance(value, BaseOutput):
        return {k: _select_half(v, batch, second) for k, v in value.items()}
    return value


def _duplicate(value):
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim > 0 else value
    if isinstance(value, BaseOutput):
        return type(value)(**{f.name: _duplicate(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        converted = [_duplicate(v) for v in value]
        return type(value)(converted) if isinstance(value, list) else tuple(converted)
    if isinstance(value, dict):
        return {k: _duplicate(v) for k, v in value.items()}
    return value


class CfgBatchHook(ModelHook):
    """``primary`` marks the denoiser whose first call decides CFG when the pipeline did not.

    A call whose batch is not a CFG batch passes through untouched: a ControlNet in guess mode,
    for one, sees only the conditional half.
    """

    def __init__(self, state: GenerationState, primary: bool = True) -> None:
        super().__init__()
        self.state = state
        self.primary = primary

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        forward = self.fn_ref.original_forward
        if state.plan is None:
            return forward(*args, **kwargs)
        batch = _sample_batch(args, kwargs)
        if self.primary and batch is not None:
            state.observe_denoiser_batch(batch)
            if state.cfg and not state.is_cfg_batch(batch):
                raise RuntimeError(
                    f"T-GATE supports classifier-free guidance over a batch of two halves; this pipeline runs its "
                    f"denoiser on a batch of {batch} for {state.latent_batch} latents."
                )
            state.counters.count_denoiser_call(state.step, batch // 2 if state.halve_batch else batch)
        cfg_call = batch is not None and bool(state.cfg) and state.is_cfg_batch(batch)
        if not (cfg_call and state.halve_batch):
            state.cfg_batch_call = cfg_call
            return forward(*args, **kwargs)
        state.cfg_batch_call = False
        second = state.cfg_half == "second"
        output = forward(*_select_half(args, batch, second), **_select_half(kwargs, batch, second))
        return _duplicate(output)
