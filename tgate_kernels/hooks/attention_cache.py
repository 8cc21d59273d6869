"""Caching an attention module's output around whatever processor it has installed.

The hook never re-implements attention: the cached value is exactly what the module's own
forward (its processor, IP-Adapter's, a LoRA's, any attention backend) returned. Whether the
module is self- or cross-attention was decided when T-GATE was enabled
(:mod:`tgate_kernels.engine.attention_modules`).

Outputs are cached by guidance part (:mod:`tgate_kernels.engine.guidance`): a call running the negative
and prompt halves caches both; separate calls cache one part each; at the gate the two parts of
the text pair are merged into their mean, the value every call after the gate reuses.
"""

from __future__ import annotations

import torch

from .. import _compat
from ..engine import plan_data
from ..engine.guidance import MERGED, NEGATIVE, PROMPT, TEXT_PAIR, DenoiserCall, Mode
from ..config import GateCache
from ..schedule import AttentionAction
from ..engine.generation import GenerationState
from .base import TgateHook


def merge_text_pair(
    output: torch.Tensor, parts: tuple[str, ...], kept_alone: str | None = None,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """``output`` of a call carrying ``parts`` with the prompt and negative-prompt rows replaced by
    their mean (the reference's ``(first + second) / 2``; with ``kept_alone``, by that part's
    rows), and the parts that now lay it out."""
    chunks = output.chunk(len(parts))
    first, second = sorted((parts.index(NEGATIVE), parts.index(PROMPT)))
    if kept_alone is not None:
        merged = chunks[parts.index(kept_alone)]
    else:
        merged = (chunks[first] + chunks[second]) / 2
    runs, pieces = [], []
    for part, chunk in zip(parts, chunks):
        if part not in TEXT_PAIR:
            runs.append(part)
            pieces.append(chunk)
        elif MERGED not in runs:
            runs.append(MERGED)
            pieces.append(merged)
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)), tuple(runs)


class PartCache:
    """One attention module's cached outputs, each covering some guidance parts."""

    def __init__(self) -> None:
        self._entries: list[tuple[tuple[str, ...], torch.Tensor]] = []
        self._gate_step: int | None = None
        self._text_parts: dict[str, torch.Tensor] = {}
        self._kept_alone: str | None = None

    def clear(self) -> None:
        self._entries = []
        self._gate_step = None
        self._text_parts = {}
        self._kept_alone = None

    def store(self, output: torch.Tensor, parts: tuple[str, ...]) -> None:
        self._entries = [(p, t) for p, t in self._entries if not set(p) & set(parts)]
        self._entries.append((parts, output))

    def store_at_gate(self, output: torch.Tensor, parts: tuple[str, ...], step: int, kept_alone: str | None = None) -> None:
        """Cache at the gate: the text pair's parts become their mean (or, with ``kept_alone``,
        that part's output), the merged part; what was cached before the gate goes."""
        if self._gate_step != step:
            self.clear()
            self._gate_step = step
        self._kept_alone = kept_alone
        if all(part in parts for part in TEXT_PAIR):
            self.store(*merge_text_pair(output, parts, kept_alone))
        elif len(parts) == 1 and parts[0] in TEXT_PAIR:
            # separate calls bring one part each: the mean is taken when it is first needed
            self._text_parts[parts[0]] = output
        else:
            self.store(output, parts)

    def lookup(self, parts: tuple[str, ...], running: tuple[str, ...] = ()) -> torch.Tensor | None:
        """The cached output for ``parts``; ``running``: the parts the call actually runs on (with
        separate calls, the kept part's), whose output stands for the merged part where the two
        parts' outputs cannot be averaged (texts of different lengths)."""
        for covered, tensor in self._entries:
            if covered == parts:
                return tensor
        pieces = [self._part(part, running) for part in parts]
        if any(piece is None for piece in pieces):
            return None
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _part(self, part: str, running: tuple[str, ...] = ()) -> torch.Tensor | None:
        if part == MERGED and self._text_parts:
            seen = [self._text_parts[p] for p in TEXT_PAIR if p in self._text_parts]
            if self._kept_alone in self._text_parts:
                seen = [self._text_parts[self._kept_alone]]
            elif len(seen) == 2 and seen[0].shape != seen[1].shape:
                # a joint-attention text stream over texts of different lengths (Qwen-Image drops
                # the padding): no mean exists, the part that runs after the gate keeps its own
                kept = next((p for p in running if p in self._text_parts), None)
                seen = [self._text_parts[kept]] if kept is not None else seen[:1]
            self._text_parts = {}
            self.store(seen[0] if len(seen) == 1 else (seen[0] + seen[1]) / 2, (MERGED,))
        for covered, tensor in self._entries:
            if part in covered:
                return tensor.chunk(len(covered))[covered.index(part)]
        if part in TEXT_PAIR:
            return self._part(MERGED, running)
        return None


class ModuleRunsTwice(RuntimeError):
    """An attention module ran more than once within one denoiser call."""


class AttentionCacheHook(TgateHook):
    """Computes, caches or reuses one attention module's output as the step's plan says.

    With ``plan_as_data`` (a denoiser T-GATE compiles) it follows the plan's flags instead, in
    code ``torch.compile`` can trace once for every step (:mod:`tgate_kernels.engine.plan_data`); the
    first call of each layout runs it eagerly, which creates the buffers the graph then updates.
    """

    name = "tgate_attention_cache"

    def __init__(
        self, state: GenerationState, denoiser: str, cross: bool, plan_as_data: bool = False, module_name: str = "",
        text_stream: bool = False,
    ) -> None:
        super().__init__(state)
        self.denoiser = denoiser
        self.cross = cross
        self.text_stream = text_stream
        """A module of a dual-stream block's text stream: its output's rows are the text's, which a
        single-stream block taking one joined sequence reads (:attr:`CallContext.text_rows`)."""
        self.plan_as_data = plan_as_data
        self.caches: dict[int, PartCache] = {}
        """One cache per run of the denoiser within a step (:attr:`DenoiserCall.run`)."""
        self._last_call: DenoiserCall | None = None
        self.key = f"{denoiser}.{module_name}" if module_name else f"{denoiser}.{id(self)}"
        """This hook's caches under compile are named ``{key}/{role}/{rows}/{dtype}/{device}``."""

    def reset_state(self, module):
        self.caches = {}
        self._last_call = None
        return module

    def detached(self, module) -> None:
        self.caches = {}
        self._last_call = None

    def cache_of(self, call: DenoiserCall) -> PartCache:
        cache = self.caches.get(call.run)
        if cache is None:
            cache = self.caches[call.run] = PartCache()
        return cache

    def cached_for(self, call: DenoiserCall) -> torch.Tensor | None:
        """The output to reuse in ``call``, for callers that skip the module's call; recorded as a reuse."""
        cached = self.cache_of(call).lookup(call.runs, call.parts)
        if cached is not None and self.state.context.recorder is not None:
            self.state.context.recorder.attention(self.state.step, self.denoiser, self.cross, reused=True)
        return cached

    def forward_in_generation(self, module, *args, **kwargs):
        output = self._forward_in_generation(*args, **kwargs)
        context = self.state.context
        if self.text_stream and context.call is not None:
            context.text_rows = (context.call, output.shape[1])
        return output

    def _forward_in_generation(self, *args, **kwargs):
        state = self.state
        context = state.context
        call = context.call
        if call is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if not torch.compiler.is_compiling():
            # compiled graphs are traced from eager first calls, where this is seen too
            if self._last_call is call:
                raise ModuleRunsTwice(
                    f"`{self.key}` ran a second time within one call of `{self.denoiser}` (in step {state.step}): its "
                    f"runs take different slices of the input (as FreeNoise's context windows or split inference do), "
                    f"which T-GATE cannot tell apart, so it would reuse one run's output for another. Turn that option "
                    f"off to use T-GATE. The call was stopped, and this generation's caches are dropped."
                )
            self._last_call = call
        if self.plan_as_data:
            return self._forward_by_flags(call, *args, **kwargs)
        plan = state.plan
        action = plan.cross_attention if self.cross else plan.self_attention
        if action is AttentionAction.REUSE:
            cached = self.cached_for(call)
            if cached is not None:
                return self.reused(cached, args, kwargs)
        keeps = action is AttentionAction.CACHE or (action is AttentionAction.REUSE and self.cross and state.reuse_fills_cache)
        output = self.computed(keeps, args, kwargs)
        if state.context.recorder is not None:
            state.context.recorder.attention(state.step, self.denoiser, self.cross, reused=False)
        observer = context.observer
        if self.cross and plan.cfg_batch and observer is not None:
            observer((id(self), call.run, call.runs), call.runs, self.observed(output))
        if action is AttentionAction.CACHE:
            if plan.average_cfg_halves:
                self.cache_of(call).store_at_gate(self.kept_of(output), call.runs, plan.step, self._kept_alone())
            else:
                self.cache_of(call).store(self.kept_of(output), call.runs)
        elif keeps:
            self.cache_of(call).store(self.kept_of(output), call.runs)
        return self.returned(output)

    def _kept_alone(self) -> str | None:
        """The part whose output the gate caches alone (``gate_cache="kept-part"``), or ``None``
        for the mean of the text pair."""
        config = self.state.config
        if config is None or config.gate_cache is not GateCache.KEPT_PART:
            return None
        layout = self.state.guidance.layout
        return None if layout is None else layout.kept

    # -- what is cached and how it is reused (a subclass caching part of a module's work overrides these)

    def computed(self, keeps: bool, args: tuple, kwargs: dict):
        """The module's own output (``keeps``: what :meth:`kept_of` needs is to be kept from it)."""
        return self.fn_ref.original_forward(*args, **kwargs)

    def kept_of(self, output) -> torch.Tensor:
        """What is cached of a computed output."""
        return output

    def observed(self, output) -> torch.Tensor:
        """What the automatic gate watches converge."""
        return output

    def returned(self, output):
        """What a computed call returns."""
        return output

    def reused(self, cached: torch.Tensor, args: tuple, kwargs: dict):
        """The output of a call after the gate, given what was cached."""
        return cached

    # -- the plan as data -------------------------------------------------------------------

    def _buffer_key(self, role: str, like: torch.Tensor) -> str:
        return f"{self.key}/{role}/{like.shape[0]}/{like.dtype}/{like.device}"

    def _buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        return self.state.context.plan_data.buffer(self._buffer_key(role, like), like)

    def _forward_by_flags(self, call: DenoiserCall, *args, **kwargs):
        state = self.state
        data = state.context.plan_data
        sample = args[0] if args else kwargs["hidden_states"]
        flags = data.bound[plan_data.FLAGS]
        reuse_self, store_self = flags[plan_data.REUSE_SELF], flags[plan_data.STORE_SELF]
        if data.after_gate and self.cross:
            if data.cross_ready(self.denoiser):
                return self.reused(data.bound[self._buffer_key("after", sample)], args, kwargs)
            output = self.computed(state.reuse_fills_cache, args, kwargs)
            if state.reuse_fills_cache:
                kept = self.kept_of(output)
                self._buffer("after", kept).copy_(kept)
            return self.returned(output)
        output = self.computed(self.cross, args, kwargs)
        if data.after_gate:
            computed = self.kept_of(output)
            kept = self._buffer("after", computed)
            result = self.reused(torch.where(reuse_self, kept, computed), args, kwargs)
            kept.copy_(torch.where(store_self, computed, kept))
            return result
        result = self.returned(output)
        if not self.cross:
            computed = self.kept_of(output)
            result = self.reused(self._self_before_gate(computed, call, reuse_self, store_self, flags[plan_data.FIRST_PART]), args, kwargs)
        self._keep_at_gate(self.kept_of(output), call, flags[plan_data.GATE], flags[plan_data.FIRST_PART])
        return result

    def _self_before_gate(
        self, computed: torch.Tensor, call: DenoiserCall, reuse: torch.Tensor, store: torch.Tensor, first: torch.Tensor,
    ) -> torch.Tensor:
        """Self-attention before the gate: the output cached at the last caching step where the plan
        reuses, else the one computed (cached where the plan says)."""
        layout = self.state.guidance.layout
        shape = "x".join(map(str, computed.shape))
        # the first call's buffer is the same whether the layout is known to be separate calls or
        # not yet (a pipeline without cache_context is known to call once per part at its second call)
        mine = self._buffer(f"before-first-{shape}", computed)
        if not (layout is not None and layout.mode is Mode.SEPARATE and call.parts[0] in TEXT_PAIR):
            result = torch.where(reuse, mine, computed)
            mine.copy_(torch.where(store, computed, mine))
            return result
        # one guidance part per call: each part keeps its own output (the first call's and the
        # second's, chosen by a flag so one graph serves both)
        other = self._buffer(f"before-second-{shape}", computed)
        result = torch.where(reuse, torch.where(first, mine, other), computed)
        mine.copy_(torch.where(store & first, computed, mine))
        other.copy_(torch.where(store & ~first, computed, other))
        return result

    def _keep_at_gate(self, output: torch.Tensor, call: DenoiserCall, gate: torch.Tensor, first: torch.Tensor) -> None:
        """At the gate, what the steps after it reuse: the mean over the text pair (or the kept
        part's own, ``gate_cache="kept-part"``)."""
        parts = call.parts
        layout = self.state.guidance.layout
        if all(part in parts for part in TEXT_PAIR):
            merged, _ = merge_text_pair(output, parts, self._kept_alone())
            kept = self._buffer("after", merged)
            kept.copy_(torch.where(gate, merged, kept))
        elif layout is not None and layout.mode is Mode.SEPARATE and parts[0] in TEXT_PAIR:
            kept_alone = self._kept_alone()
            if kept_alone is not None:
                if parts[0] == kept_alone:
                    kept = self._buffer("after", output)
                    kept.copy_(torch.where(gate, output, kept))
                return
            # one part per call, the kept one first (see GuidanceTracker): at the gate the first
            # call stores its own output, the second makes the mean with it where its text has the
            # same length. The second never makes the buffer the kept part reads after the gate:
            # with texts of different lengths (see PartCache) it has another shape, and the kept
            # part's own stands.
            kept = self.state.context.plan_data.existing(self._buffer_key("after", output))
            if kept is None and parts[0] == layout.kept:
                kept = self._buffer("after", output)
            if kept is None or kept.shape != output.shape:
                return
            kept.copy_(torch.where(gate, torch.where(first, output, (kept + output) / 2), kept))
        else:
            kept = self._buffer("after", output)
            kept.copy_(torch.where(gate, output, kept))

_compat.diffusers_hook(AttentionCacheHook, stateful=True)


class JointAttentionCacheHook(AttentionCacheHook):
    """Caches a dual-stream block's joint attention as self-attention: its image and text outputs
    side by side along the rows, one tensor, so that the mean over the guidance parts at the gate
    and the compiled path's buffers are :class:`AttentionCacheHook`'s."""

    name = "tgate_joint_attention_cache"

    def __init__(self, state: GenerationState, denoiser: str, plan_as_data: bool = False, module_name: str = "") -> None:
        super().__init__(state, denoiser, cross=False, plan_as_data=plan_as_data, module_name=module_name)
        self._image_rows: int | None = None
        """The image rows of the outputs cached (the text rows follow them)."""

    def reset_state(self, module):
        self._image_rows = None
        return super().reset_state(module)

    def kept_of(self, output) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return output
        image, text = output
        self._image_rows = image.shape[1]
        return torch.cat([image, text.to(image.dtype)], dim=1)

    def reused(self, cached: torch.Tensor, args: tuple, kwargs: dict):
        if self._image_rows is None:
            return cached
        return cached[:, : self._image_rows], cached[:, self._image_rows :]

_compat.diffusers_hook(JointAttentionCacheHook, stateful=True)
