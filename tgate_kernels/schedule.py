"""The T-GATE schedule: what each attention kind does at each denoising step.

Pure Python and the single source of truth for "what happens at step c". Everything else
(hooks, benchmarks, MACs counts) asks :func:`plan_step`, or :func:`candidate_plan` for the steps
of ``gate_step="auto"``'s window before its gate is chosen.

The schedule is the one of the reference implementation (``tgate`` 1.0.0). With ``g`` the
resolved gate step and ``c`` the 0-based solver step:

* before the gate (the paper's semantics-planning phase), ``c < g - 1``: cross-attention is
  computed; self-attention is computed for ``c < warm_up``, cached at ``c == warm_up``, then
  cached when ``c % sp_interval == 0`` and reused otherwise;
* gate, ``c == g - 1``: both attention outputs are computed and cached; with a
  classifier-free-guidance (CFG) batch the cache is the mean of its two halves, so it fits the
  halved batch that follows;
* after the gate (the paper's fidelity-improving phase), ``c >= g``: cross-attention is reused,
  the CFG batch is dropped, self-attention is cached when ``c % fi_interval == 0`` and reused
  otherwise. With ``guidance_after_gate="kept"`` every part keeps running after the gate, each
  reusing what it cached at the gate itself (no mean is taken).

``REUSE`` falls back to computing (without caching) when nothing was cached yet in this
generation, as the reference does; with ``gate_step=0`` that means cross-attention is always
computed and only CFG is dropped. The one exception: after a gate that cached cross-attention, a
denoiser that first runs after it (a second expert, a ControlNet that starts late) caches its
own cross-attention at its first step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import GuidanceAfterGate, TgateConfig


class AttentionAction(enum.Enum):
    COMPUTE = "compute"
    CACHE = "compute-and-cache"
    REUSE = "reuse"


@dataclass(frozen=True)
class StepPlan:
    """What one solver step does."""

    step: int
    self_attention: AttentionAction
    cross_attention: AttentionAction
    cfg_batch: bool
    """Whether the denoiser still sees the doubled CFG batch (only meaningful when the
    generation uses CFG at all)."""
    average_cfg_halves: bool
    """Whether caches taken at this step hold the mean of the CFG halves (the gate step of a
    CFG generation)."""


def plan_step(step: int, config: TgateConfig, gate_step: int) -> StepPlan:
    """The plan of solver step ``step`` for a resolved ``gate_step``."""
    if step < gate_step - 1:
        if step < config.warm_up:
            self_action = AttentionAction.COMPUTE
        elif step == config.warm_up or step % config.sp_interval == 0:
            self_action = AttentionAction.CACHE
        else:
            self_action = AttentionAction.REUSE
        return StepPlan(step, self_action, AttentionAction.COMPUTE, cfg_batch=True, average_cfg_halves=False)
    # with the guidance kept after the gate, every part caches its own at the gate and runs after it
    dropped = config.guidance_after_gate is GuidanceAfterGate.DROPPED
    if step == gate_step - 1:
        return StepPlan(step, AttentionAction.CACHE, AttentionAction.CACHE, cfg_batch=True, average_cfg_halves=dropped)
    self_action = AttentionAction.CACHE if step % config.fi_interval == 0 else AttentionAction.REUSE
    return StepPlan(step, self_action, AttentionAction.REUSE, cfg_batch=not dropped, average_cfg_halves=False)


def candidate_plan(step: int) -> StepPlan:
    """A step of ``gate_step="auto"``'s window while no gate is chosen: everything is computed, and
    cached as at a gate step, so that the gate can fall right after it."""
    return StepPlan(step, AttentionAction.CACHE, AttentionAction.CACHE, cfg_batch=True, average_cfg_halves=True)


def plan_generation(config: TgateConfig, num_steps: int) -> list[StepPlan]:
    """Plans of every step of a generation of ``num_steps`` solver steps (a fixed gate)."""
    if config.auto:
        raise ValueError("`gate_step='auto'` is chosen during each generation: its plans cannot be listed in advance.")
    gate = config.resolve_gate_step(num_steps)
    return [plan_step(c, config, gate) for c in range(num_steps)]
