"""Caching an attention module's output around whatever processor it has installed.

The hook never re-implements attention: the cached value is exactly what the module's own
forward (its processor, IP-Adapter's, a LoRA's, any attention backend) returned. Whether the
module is self- or cross-attention was decided when T-GATE was enabled
(:mod:`tgate_kernels.attention_modules`).

Outputs are cached by guidance part (:mod:`tgate_kernels.guidance`): a call running the negative
and prompt halves caches both; separate calls cache one part each; at the gate the two parts of
the text pair are merged into their mean, the value every call after the gate reuses.
"""

from __future__ import annotations

import torch

from ..guidance import MERGED, PROMPT, NEGATIVE, TEXT_PAIR, DenoiserCall
from ..schedule import AttentionAction
from ..state import GenerationState
from .base import TgateHook


class PartCache:
    """One attention module's cached outputs, each covering some guidance parts."""

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._gate_step: int | None = None
        self._text_parts: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self._entries = []
        self._gate_step = None
        self._text_parts = {}

    def store(self, output: torch.Tensor, parts: tuple[str, ...]) -> None:
        self._entries = [(p, t) for p, t in self._entries if not set(p) & set(parts)]
        self._entries.append((parts, output))

    def store_at_gate(self, output: torch.Tensor, parts: tuple[str, ...], step: int) -> None:
        """Cache at the gate: the text pair's parts become their mean, the merged part; what was
        cached before the gate goes."""
        if self._gate_step != step:
            self.clear()
            self._gate_step = step
        if all(part in parts for part in TEXT_PAIR):
            chunks = output.chunk(len(parts))
            first, second = sorted((parts.index(NEGATIVE), parts.index(PROMPT)))
            merged = (chunks[first] + chunks[second]) / 2
            runs, pieces = [], []
            for part, chunk in zip(parts, chunks):
                if part not in TEXT_PAIR:
                    runs.append(part)
                    pieces.append(chunk)
                elif MERGED not in runs:
                    runs.append(MERGED)
                    pieces.append(merged)
            self.store(pieces[0] if len(pieces) == 1 else torch.cat(pieces), tuple(runs))
        elif len(parts) == 1 and parts[0] in TEXT_PAIR:
            # separate calls bring one part each: the mean is taken when it is first needed
            self._text_parts[parts[0]] = output
        else:
            self.store(output, parts)

    def lookup(self, parts: tuple[str, ...]) -> torch.Tensor | None:
        for covered, tensor in self._entries:
            if covered == parts:
                return tensor
        pieces = [self._part(part) for part in parts]
        if any(piece is None for piece in pieces):
            return None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _part(self, part: str) -> torch.Tensor | None:
        if part == MERGED and self._text_parts:
            seen = [self._text_parts[p] for p in TEXT_PAIR if p in self._text_parts]
            self._text_parts = {}
            self.store(seen[0] if len(seen) == 1 else (seen[0] + seen[1]) / 2, (MERGED,))
        for covered, tensor in self._entries:
            if part in covered:
                return tensor.chunk(len(covered))[covered.index(part)]
        if part in TEXT_PAIR:
            return self._part(MERGED)
        return None


class AttentionCacheHook(TgateHook):
    """Computes, caches or reuses one attention module's output as the step's plan says."""

    name = "tgate_attention_cache"
    _is_stateful = True

    def __init__(self, state: GenerationState, denoiser: str, cross: bool) -> None:
        super().__init__(state)
        self.denoiser = denoiser
        self.cross = cross
        self.cache = PartCache()

    def reset_state(self, module):
        self.cache.clear()
        return module

    def detached(self, module) -> None:
        self.cache.clear()

    def cached_for(self, call: DenoiserCall) -> torch.Tensor | None:
        """The output to reuse in ``call``, for callers that skip the module's call; recorded as a reuse."""
        cached = self.cache.lookup(call.runs)
        if cached is not None and self.state.recorder is not None:
            self.state.recorder.attention(self.state.step, self.denoiser, self.cross, reused=True)
        return cached

    def forward_in_generation(self, module, *args, **kwargs):
        state = self.state
        call = state.call
        if call is None:
            return self.original(*args, **kwargs)
        plan = state.plan
        action = plan.cross_attention if self.cross else plan.self_attention
        if action is AttentionAction.REUSE:
            cached = self.cached_for(call)
            if cached is not None:
                return cached
        output = self.original(*args, **kwargs)
        if state.recorder is not None:
            state.recorder.attention(state.step, self.denoiser, self.cross, reused=False)
        if action is AttentionAction.CACHE:
            if plan.average_cfg_halves:
                self.cache.store_at_gate(output, call.runs, plan.step)
            else:
                self.cache.store(output, call.runs)
        elif action is AttentionAction.REUSE and self.cross and state.reuse_fills_cache:
            self.cache.store(output, call.runs)
        return output
