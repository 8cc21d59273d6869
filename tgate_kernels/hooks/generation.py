"""Finding where a generation starts, which step it is at, and where it ends.

``pipe(...)`` looks ``__call__`` up on the class, so nothing can be hung on it per instance.
Every diffusers pipeline, however, opens its denoising loop with ``self.progress_bar(total=n)``
and moves the bar exactly when a solver step closes (the same rule the reference counts steps
by: second-order schedulers and PNDM's extra call included, img2img's shortened schedule
too). Wrapping the instance's ``progress_bar`` therefore gives the number of steps actually run,
the current step, and an ``__exit__`` that runs also when the loop raises.

``prepare_latents`` is wrapped to learn the latent batch, which tells a CFG batch (twice as
large) in pipelines that do not expose ``do_classifier_free_guidance``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..schedule import TgateSettings
from ..state import GenerationState


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
    """Installs the ``progress_bar``/``prepare_latents`` wrappers on one pipeline instance."""

    def __init__(
        self,
        pipe,
        state: GenerationState,
        settings_for_call: Callable[[], TgateSettings | None],
        detect_cfg: Callable[[object], bool | None],
    ) -> None:
        self.pipe = pipe
        self.state = state
        self.settings_for_call = settings_for_call
        self.detect_cfg = detect_cfg
        self._saved: dict[str, object] = {}
        self._installed: list[str] = []

    def install(self) -> None:
        pipe = self.pipe
        original_progress_bar = pipe.progress_bar
        original_prepare_latents = getattr(pipe, "prepare_latents", None)
        state = self.state

        def progress_bar(iterable=None, total=None):
            settings = self.settings_for_call()
            if settings is None:
                return original_progress_bar(iterable=iterable, total=total)
            if iterable is not None:
                num_steps = len(iterable)
            elif total is not None:
                num_steps = int(total)
            else:
                return original_progress_bar(iterable=iterable, total=total)
            state.begin(settings, num_steps, self.detect_cfg(pipe))
            try:
                bar = original_progress_bar(iterable=iterable, total=total)
            except BaseException:
                state.end()
                raise
            if iterable is not None:
                return _tracked_iterable(bar, state)
            return _TrackedProgressBar(bar, state)

        def prepare_latents(*args, **kwargs):
            result = original_prepare_latents(*args, **kwargs)
            latents = result[0] if isinstance(result, (tuple, list)) else result
            if isinstance(latents, torch.Tensor):
                state.latent_batch = latents.shape[0]
            return result

        self._saved = {name: pipe.__dict__[name] for name in ("progress_bar", "prepare_latents") if name in pipe.__dict__}
        self._installed = ["progress_bar"]
        pipe.progress_bar = progress_bar
        if original_prepare_latents is not None:
            pipe.prepare_latents = prepare_latents
            self._installed.append("prepare_latents")

    def uninstall(self) -> None:
        for name in self._installed:
            if name in self._saved:
                setattr(self.pipe, name, self._saved[name])
            else:
                self.pipe.__dict__.pop(name, None)
        self._installed = []
        self.state.end()
