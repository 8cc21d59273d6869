"""The generation running on one pipeline: its record, and the context of the call running now.

One :class:`GenerationState` per enabled pipeline. It is *active* only between the opening and
the closing of a generation's denoising loop, and only for the thread that opened it; outside it
every hook passes calls straight through. Opening and closing both reset every cache, so nothing
outlives a call, also when the call raises. What follows the generation step by step beside the
hooks (DeepCache, PAG's processors, the auto gate) is a :class:`StepListener`; what the hooks
read of the denoiser call running now is its :class:`CallContext`.
"""

from __future__ import annotations

import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..config import TgateConfig
from ..schedule import StepPlan, plan_step
from .guidance import DenoiserCall, GuidanceLayout, GuidanceTracker
from .plan_data import PlanData

if TYPE_CHECKING:
    from .recording import StepRecorder


class ConcurrentGenerationError(RuntimeError):
    """Two threads called one T-GATE pipeline at the same time, or a generation called its own
    pipeline again (from a step callback)."""


@dataclass(frozen=True)
class GenerationSummary:
    """What the last generation of a pipeline ran with."""

    num_steps: int
    gate_step: int
    """The gate the generation ran with (for ``gate_step="auto"``, the one it chose)."""
    layout: GuidanceLayout | None
    """How the pipeline guided (``None``: no denoiser call was seen)."""
    cross_attention_changes: tuple[float, ...] = ()
    """With ``gate_step="auto"``: the relative change of the cross-attention outputs at each step
    from the second to the one before the gate."""

    @property
    def guidance(self) -> str:
        return self.layout.describe() if self.layout is not None else "no denoiser call seen"


class CallContext:
    """What the hooks read of the denoiser call running now, beside the step's plan."""

    def __init__(self) -> None:
        self.call: DenoiserCall | None = None
        """The denoiser call running now: the attention hooks cache and reuse by its parts."""
        self.plan_data = PlanData()
        """The plan as flags, and this generation's caches, for denoisers T-GATE compiles."""
        self.recorder: StepRecorder | None = None
        """Records what the hooks do (``view(pipe).record()``)."""
        self.observer: Callable[[object, tuple, torch.Tensor], None] | None = None
        """Sees every cross-attention output computed in a guided call (the auto gate, while it chooses)."""
        self.text_rows: tuple[DenoiserCall, int] | None = None
        """The call in which a dual-stream block's text stream last ran, and its text rows."""
        self.text_lengths: tuple[DenoiserCall, int | tuple[int, ...]] | None = None
        """The call whose text mask was last read, and each sample's text rows by it (one count
        where they are all equal)."""


class GenerationState:
    def __init__(self, guidance: GuidanceTracker) -> None:
        self.guidance = guidance
        self.config: TgateConfig | None = None
        self.num_steps = 0
        self.gate_step = 0
        """The gate of this generation (for ``gate_step="auto"``, the latest it may be until it is chosen)."""
        self.step = 0
        self.plan: StepPlan | None = None
        self.gate_history: tuple[float, ...] = ()
        """What the auto gate measured in this generation (its summary's ``cross_attention_changes``)."""
        self.context = CallContext()
        self.last: GenerationSummary | None = None
        self.owner: int | None = None
        """The thread running the generation (hooks pass every other thread's calls through)."""
        self._loop_frame = None
        """The frame of the pipeline's call whose denoising loop this generation follows: while it
        is on its thread's stack the generation runs; once it is not, the generation was left by
        an exception that interrupted its own closing, and the next call closes it."""
        self._cut_announced = False
        self._stateful_hooks: list = []
        self._listeners: list[StepListener] = []

    # -- who is told what ------------------------------------------------------------------

    def add_stateful_hook(self, hook) -> None:
        """``hook.reset_state(module)`` runs when a generation opens and when it closes (the same
        method diffusers' ``reset_stateful_hooks`` calls)."""
        self._stateful_hooks.append(hook)

    def remove_stateful_hook(self, hook) -> None:
        if hook in self._stateful_hooks:
            self._stateful_hooks.remove(hook)

    def add_listener(self, listener: "StepListener") -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: "StepListener") -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- the generation --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.plan is not None

    @property
    def reuse_fills_cache(self) -> bool:
        """After a gate that cached cross-attention, a denoiser first active after it (a second
        expert, a ControlNet that starts late) caches its own at its first step."""
        return self.gate_step >= 1

    def _left_behind(self) -> bool:
        """Whether the generation is open though the call that opened it is gone."""
        owner, loop = self.owner, self._loop_frame
        if self.plan is None or owner is None or loop is None:
            return False
        frame = sys._getframe() if owner == threading.get_ident() else sys._current_frames().get(owner)
        while frame is not None:
            if frame is loop:
                return False
            frame = frame.f_back
        return True

    def close_left_behind(self) -> None:
        """Close a generation an interrupt left open (its caches, DeepCache's wrappers)."""
        if self._left_behind():
            self.end()

    def check_free(self) -> None:
        """Refuse a second generation while one runs in another thread."""
        self.close_left_behind()
        owner = self.owner
        if self.plan is not None and owner is not None and owner != threading.get_ident():
            raise ConcurrentGenerationError(
                "this pipeline is running a T-GATE generation in another thread; T-GATE keeps one generation's "
                "caches per pipeline, so concurrent calls are refused: give each thread its own pipeline."
            )

    def check_can_open(self) -> None:
        """Refuse to open a generation while one runs: in another thread (one generation's
        caches per pipeline), or in this one (a call of the pipeline from its own step callback
        would run through, and overwrite, the running generation's caches)."""
        self.check_free()
        if self.plan is not None and self.owner == threading.get_ident():
            raise ConcurrentGenerationError(
                f"this pipeline was called again while its T-GATE generation runs (at step {self.step} of "
                f"{self.num_steps}; a call from its own step callback?). T-GATE keeps one generation's caches per "
                f"pipeline, so the nested call is refused before it changes anything: make it on another pipeline "
                f"(with its own denoiser), or after this call returns."
            )

    def check_idle(self, action: str) -> None:
        """Refuse to ``action`` the pipeline while a generation runs on it (in any thread)."""
        self.close_left_behind()
        if self.plan is not None:
            raise ConcurrentGenerationError(
                f"cannot {action} a pipeline while a T-GATE generation runs on it (at step {self.step} of "
                f"{self.num_steps}): its hooks drive that generation. Do it after the call returns."
            )

    def begin(self, config: TgateConfig, num_steps: int, says_guided: bool | None, loop_frame=None) -> None:
        """Open a generation of ``num_steps`` solver steps (``says_guided``: what the pipeline's
        ``do_classifier_free_guidance`` says, ``None`` when it has none; ``loop_frame``: the frame
        of the pipeline's call that runs the loop)."""
        self.check_free()
        gate = config.resolve_gate_step(num_steps, beyond_allowed=True)
        if gate > num_steps:
            # img2img's `strength` runs fewer steps than asked for: a gate set for the full
            # schedule is never reached, as with the reference
            warnings.warn(
                f"`gate_step`={gate} is beyond the {num_steps} steps this call runs: cross-attention and "
                f"classifier-free guidance are kept at every step; self-attention is still cached before the gate "
                f"(every sp_interval={config.sp_interval} steps from warm_up={config.warm_up}).",
                stacklevel=4,
            )
        self._reset_stateful_hooks()
        self.config = config
        self.num_steps = num_steps
        self.gate_step = gate
        self.step = 0
        self.gate_history = ()
        self.guidance.begin(says_guided, told_unguided=config.lcm is True)
        self.context.plan_data.begin()
        self._cut_announced = False
        self.owner = threading.get_ident()
        self._loop_frame = loop_frame
        self.plan = plan_step(0, config, gate)
        if self.context.recorder is not None:
            self.context.recorder.generation_started(self)
        try:
            for listener in self._listeners:
                listener.generation_started(self)
                listener.step_started(self)
        except BaseException:
            # the pipeline's loop never opens, so nothing else would close the generation
            self.end()
            raise

    def advance(self, steps: int = 1) -> None:
        """Close ``steps`` solver steps (the pipeline's progress bar moved)."""
        if self.plan is None:
            return
        for listener in self._listeners:
            listener.step_ended(self)
        self.step += steps
        self.plan = plan_step(self.step, self.config, self.gate_step)
        self.guidance.step_started(self.step)
        for listener in self._listeners:
            listener.step_started(self)

    def announce_cut(self) -> None:
        """The first denoiser call of this generation that runs on fewer parts than it carries."""
        if not self._cut_announced:
            self._cut_announced = True
            for listener in self._listeners:
                listener.calls_cut(self)

    def end(self) -> None:
        was_active = self.plan is not None
        try:
            if was_active:
                self.last = GenerationSummary(self.num_steps, self.gate_step, self.guidance.layout, self.gate_history)
                failure = None
                for listener in self._listeners:
                    try:  # every listener puts back what it changed, even when one of them fails
                        listener.generation_ended(self)
                    except BaseException as error:
                        failure = failure or error
                if failure is not None:
                    raise failure
        finally:
            self.plan = None
            self.context.call = None
            self.config = None
            self.owner = None
            self._loop_frame = None
            self.context.plan_data.release()
            self.guidance.end()
            self._reset_stateful_hooks()

    def _reset_stateful_hooks(self) -> None:
        for hook in self._stateful_hooks:
            hook.reset_state(None)


class StepListener:
    """Something that follows a generation step by step (DeepCache's coordinator, PAG's
    processors, the auto gate). ``step_started`` may change the step's plan; ``step_ended``
    may move the gate, from the next step on."""

    def generation_started(self, state: GenerationState) -> None:
        pass

    def step_started(self, state: GenerationState) -> None:
        pass

    def step_ended(self, state: GenerationState) -> None:
        pass

    def calls_cut(self, state: GenerationState) -> None:
        pass

    def generation_ended(self, state: GenerationState) -> None:
        pass
