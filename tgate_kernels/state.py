"""Per-generation state shared by the hooks of one pipeline.

One :class:`GenerationState` per enabled pipeline. It is *active* only between the opening and
the closing of a generation's denoising loop; outside it every hook passes calls straight
through. Opening and closing both clear every cache, so nothing outlives a call, also when the
call raises.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .schedule import AttentionAction, StepPlan, TgateSettings, plan_step


class GenerationState:
    def __init__(self, cfg_half: str = "first") -> None:
        if cfg_half not in ("first", "second"):
            raise ValueError(f"`cfg_half` must be 'first' or 'second', got {cfg_half!r}.")
        self.cfg_half = cfg_half
        self.fused_blocks = False
        self.settings: TgateSettings | None = None
        self.num_steps = 0
        self.gate_step = 0
        self.step = 0
        self.plan: StepPlan | None = None
        self.cfg: bool | None = None
        self.latent_batch: int | None = None
        self.cfg_batch_call = False
        self._cache_clearers: list[Callable[[], None]] = []
        self.step_listeners: list[StepListener] = []
        self.counters = StepCounters()

    @property
    def active(self) -> bool:
        return self.plan is not None

    def register_cache(self, clear: Callable[[], None]) -> None:
        self._cache_clearers.append(clear)

    def unregister_cache(self, clear: Callable[[], None]) -> None:
        self._cache_clearers.remove(clear)

    def clear_caches(self) -> None:
        for clear in self._cache_clearers:
            clear()

    def begin(self, settings: TgateSettings, num_steps: int, cfg: bool | None) -> None:
        """Open a generation of ``num_steps`` solver steps. ``cfg`` is whether the pipeline
        runs a CFG batch, or ``None`` to detect it from the first denoiser call."""
        gate = settings.resolve_gate_step(num_steps, beyond_allowed=True)
        if gate > num_steps:
            # img2img's `strength` runs fewer steps than asked for: a gate set for the full
            # schedule is simply never reached, as with the reference
            warnings.warn(
                f"`gate_step`={gate} is beyond the {num_steps} steps this call runs: no step is gated.",
                stacklevel=4,
            )
        self.clear_caches()
        self.settings = settings
        self.num_steps = num_steps
        self.gate_step = gate
        self.step = 0
        self.cfg = None
        self.counters.reset()
        self.plan = plan_step(0, settings, gate)
        try:
            if cfg is not None:
                self.decide_cfg(cfg)
            for listener in self.step_listeners:
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
        self.step += steps
        self.plan = plan_step(self.step, self.settings, self.gate_step)
        for listener in self.step_listeners:
            listener.step_started(self)

    def end(self) -> None:
        was_active = self.plan is not None
        self.clear_caches()
        try:
            if was_active:
                for listener in self.step_listeners:
                    listener.generation_ended(self)
        finally:
            self._reset_after_generation()

    def _reset_after_generation(self) -> None:
        self.cfg_batch_call = False
        self.settings = None
        self.plan = None
        self.cfg = None
        self.latent_batch = None

    def decide_cfg(self, cfg: bool) -> None:
        if self.settings is not None and self.settings.lcm is True and cfg:
            warnings.warn(
                "T-GATE was told `lcm=True` (no classifier-free guidance), but this generation runs a "
                "CFG batch; following the pipeline: the gate averages the CFG halves and drops CFG after it.",
                stacklevel=3,
            )
        self.cfg = cfg

    def observe_denoiser_batch(self, batch: int) -> None:
        """Decide CFG from the first denoiser call when the pipeline did not say: a CFG batch is
        twice the latent batch."""
        if self.cfg is None:
            self.decide_cfg(self.latent_batch is not None and batch == 2 * self.latent_batch)

    def is_cfg_batch(self, batch: int) -> bool:
        """Whether a denoiser batch of ``batch`` is the doubled CFG batch."""
        if self.latent_batch is not None:
            return batch == 2 * self.latent_batch
        return batch % 2 == 0

    @property
    def halve_batch(self) -> bool:
        """Whether denoiser calls of this step run on one half of the CFG batch."""
        return bool(self.cfg) and self.plan is not None and not self.plan.cfg_batch

    @property
    def average_halves(self) -> bool:
        """Whether caches taken now hold the mean of the CFG halves: at the gate step, inside a
        denoiser call that runs the doubled CFG batch."""
        return self.cfg_batch_call and self.plan is not None and self.plan.average_cfg_halves

    def action(self, cross: bool) -> AttentionAction:
        return self.plan.cross_attention if cross else self.plan.self_attention


class StepListener:
    """Something that follows a generation step by step (DeepCache's coordinator, for one)."""

    def generation_started(self, state: GenerationState) -> None:
        pass

    def step_started(self, state: GenerationState) -> None:
        pass

    def generation_ended(self, state: GenerationState) -> None:
        pass


class StepCounters:
    """What the hooks did in the current generation, per step: for tests and benchmarks.

    Nothing is counted while ``torch.compile`` traces: counts keyed by step would make every
    step a new graph.
    """

    def __init__(self) -> None:
        self.attention_computed: dict[tuple[int, bool], int] = {}
        self.attention_reused: dict[tuple[int, bool], int] = {}
        self.denoiser_batches: dict[int, list[int]] = {}

    def reset(self) -> None:
        self.attention_computed.clear()
        self.attention_reused.clear()
        self.denoiser_batches.clear()

    def count_attention(self, step: int, cross: bool, reused: bool) -> None:
        if torch.compiler.is_compiling():
            return
        counts = self.attention_reused if reused else self.attention_computed
        counts[(step, cross)] = counts.get((step, cross), 0) + 1

    def count_denoiser_call(self, step: int, batch: int) -> None:
        if torch.compiler.is_compiling():
            return
        self.denoiser_batches.setdefault(step, []).append(batch)

    def computed(self, step: int, cross: bool) -> int:
        return self.attention_computed.get((step, cross), 0)

    def reused(self, step: int, cross: bool) -> int:
        return self.attention_reused.get((step, cross), 0)
