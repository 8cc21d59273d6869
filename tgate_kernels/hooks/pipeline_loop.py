"""Finding where a generation starts, which step it is at, and where it ends.

``pipe(...)`` looks ``__call__`` up on the class, so nothing can be hung on it per instance.
Every diffusers pipeline, however, opens its denoising loop with ``self.progress_bar(total=n)``
and moves the bar exactly when a solver step closes (the same rule the reference counts steps
by: second-order schedulers and PNDM's extra call included, img2img's shortened schedule
too). Wrapping the instance's ``progress_bar`` therefore gives the number of steps actually run,
the current step, and an ``__exit__`` that runs also when the loop raises.

``prepare_latents`` is wrapped to learn the latent batch, against which the rows of each
denoiser call tell how many guidance parts it carries, and ``check_inputs``, the first thing a
pipeline's call does, to refuse a call of the pipeline from inside its own running generation.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from ..config import TgateConfig
from ..engine.snapshot import InstanceAttributes
from ..engine.generation import GenerationState

Opening = tuple[TgateConfig, "bool | None"]


class _TrackedProgressBar:
    def __init__(self, bar, state: GenerationState) -> None:
        self._bar = bar
        self._state = state

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc_info):
        try:
            self._state.end()
        finally:
            suppress = self._bar.__exit__(*exc_info)
        return suppress

    def update(self, n: int = 1):
        self._state.advance(n)
        return self._bar.update(n)

    def __getattr__(self, name):
        return getattr(self._bar, name)


def _tracked_iterable(bar, state: GenerationState):
    try:
        for i, item in enumerate(bar):
            if i:
                state.advance(1)
            yield item
    finally:
        state.end()


class GenerationTracker:
    """Installs the ``progress_bar``/``prepare_latents`` wrappers on one pipeline instance.

    ``opening()`` says, when a denoising loop opens, whether it runs with T-GATE: the settings
    and what the pipeline says of its guidance, or ``None`` for a plain loop.
    """

    _WRAPPED = ("progress_bar", "prepare_latents", "check_inputs")

    def __init__(self, pipe, state: GenerationState, opening: Callable[[], Opening | None]) -> None:
        self.pipe = pipe
        self.state = state
        self.opening = opening
        self._saved: list[InstanceAttributes] = []

    def install(self) -> None:
        pipe = self.pipe
        original_progress_bar = pipe.progress_bar
        original_prepare_latents = getattr(pipe, "prepare_latents", None)
        state = self.state

        def progress_bar(iterable=None, total=None, **options):
            state.check_can_open()
            num_steps = len(iterable) if iterable is not None else total
            opening = self.opening() if num_steps else None
            if opening is None:
                return original_progress_bar(iterable=iterable, total=total, **options)
            try:
                state.begin(opening[0], int(num_steps), opening[1], loop_frame=sys._getframe(1))
                bar = original_progress_bar(iterable=iterable, total=total, **options)
            except BaseException:
                state.end()
                raise
            if iterable is not None:
                return _tracked_iterable(bar, state)
            return _TrackedProgressBar(bar, state)

        def prepare_latents(*args, **kwargs):
            result = original_prepare_latents(*args, **kwargs)
            latents = result[0] if isinstance(result, (tuple, list)) else result
            if isinstance(latents, torch.Tensor) and not state.active:
                state.guidance.latent_batch = latents.shape[0]
            return result

        original_check_inputs = getattr(pipe, "check_inputs", None)

        def check_inputs(*args, **kwargs):
            # the first thing a pipeline's call does: a nested call is refused before it changes
            # anything of the running one (its scheduler's timesteps, its guidance scale)
            state.check_can_open()
            return original_check_inputs(*args, **kwargs)

        self._saved = [InstanceAttributes([pipe], name) for name in self._WRAPPED]
        pipe.progress_bar = progress_bar
        if original_prepare_latents is not None:
            pipe.prepare_latents = prepare_latents
        if callable(original_check_inputs):
            pipe.check_inputs = check_inputs

    def uninstall(self) -> None:
        for saved in self._saved:
            saved.restore()
        self._saved = []
        self.state.end()
