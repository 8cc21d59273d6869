"""Caching an attention module's output around whatever processor it has installed.

The hook never re-implements attention: the cached value is exactly what the module's own
forward (its processor, IP-Adapter's, a LoRA's, any attention backend) returned. Whether a call
is self- or cross-attention is decided by the call itself (``encoder_hidden_states`` given or
not), as the reference does, so one hook serves every attention of the denoiser.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..schedule import AttentionAction
from ..state import GenerationState

HOOK_NAME = "tgate_attention_cache"


def _is_cross_attention_call(args: tuple, kwargs: dict) -> bool:
    encoder_hidden_states = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return encoder_hidden_states is not None


def _mean_of_halves(output: torch.Tensor) -> torch.Tensor:
    if output.shape[0] % 2:
        raise RuntimeError(
            f"T-GATE expected a classifier-free-guidance batch (even size) at the gate step, got an "
            f"attention output of batch {output.shape[0]}."
        )
    first, second = output.chunk(2)
    return (first + second) / 2


class AttentionCacheHook(ModelHook):
    _is_stateful = True

    def __init__(self, state: GenerationState) -> None:
        super().__init__()
        self.state = state
        self.cache: torch.Tensor | None = None

    def initialize_hook(self, module):
        self.state.register_cache(self.clear)
        return module

    def deinitalize_hook(self, module):
        self.state.unregister_cache(self.clear)
        self.cache = None
        return module

    def clear(self) -> None:
        self.cache = None

    def reset_state(self, module):
        self.clear()
        return module

    def reuse(self) -> torch.Tensor:
        """The cached output, counted as a reuse, for callers that skip the module's call."""
        self.state.counters.count_attention(self.state.step, cross=True, reused=True)
        return self.cache

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        if state.plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        cross = _is_cross_attention_call(args, kwargs)
        action = state.action(cross)
        if action is AttentionAction.REUSE and self.cache is not None:
            state.counters.count_attention(state.step, cross, reused=True)
            return self.cache
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.counters.count_attention(state.step, cross, reused=False)
        if action is AttentionAction.CACHE:
            self.cache = _mean_of_halves(output) if state.average_halves else output
        return output
