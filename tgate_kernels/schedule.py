"""The T-GATE schedule: what each attention kind does at each denoising step.

Pure Python and the single source of truth for "what happens at step c". Everything else
(hooks, benchmarks, MACs counts) asks :func:`plan_step`, or :func:`candidate_plan` for the steps
of ``gate_step="auto"``'s window before its gate is chosen.

The schedule is the one of the reference implementation (``tgate`` 1.0.0). With ``g`` the
resolved gate step and ``c`` the 0-based solver step:

* semantics-planning phase, ``c < g - 1``: cross-attention is computed; self-attention is
  computed for ``c < warm_up``, cached at ``c == warm_up``, then cached when
  ``c % sp_interval == 0`` and reused otherwise;
* gate, ``c == g - 1``: both attention outputs are computed and cached; with a
  classifier-free-guidance (CFG) batch the cache is the mean of its two halves, so it fits the
  halved batch that follows;
* fidelity-improving phase, ``c >= g``: cross-attention is reused, the CFG batch is dropped,
  self-attention is cached when ``c % fi_interval == 0`` and reused otherwise.

``REUSE`` falls back to computing (without caching) when nothing was cached yet in this
generation, as the reference does; with ``gate_step=0`` that means cross-attention is always
computed and only CFG is dropped. The one exception: after a gate that cached cross-attention, a
denoiser that first runs after it (a second expert, a ControlNet that starts late) caches its
own cross-attention at its first step.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, replace

from .config import check_int


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


AUTO = "auto"


@dataclass(frozen=True)
class AutoGate:
    """How ``gate_step="auto"`` chooses the gate of each generation: at the first step, between
    ``min_fraction`` and ``max_fraction`` of the steps, after which the cross-attention outputs
    changed by less than ``threshold`` (relative, mean over the layers, the slowest sample of the
    batch deciding) for ``patience`` consecutive steps; at ``max_fraction`` at the latest."""

    threshold: float = 0.08
    min_fraction: float = 0.2
    max_fraction: float = 0.6
    patience: int = 2

    def __post_init__(self) -> None:
        for name in ("threshold", "min_fraction", "max_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
                raise TypeError(f"`auto_gate['{name}']` must be a number, got {value!r} of type {type(value).__name__}.")
        if self.threshold <= 0:
            raise ValueError(f"`auto_gate['threshold']` must be > 0 (a relative change), got {self.threshold!r}.")
        for name in ("min_fraction", "max_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`auto_gate['{name}']` must be a fraction of the steps in (0, 1), got {getattr(self, name)!r}.")
        if self.min_fraction > self.max_fraction:
            raise ValueError(
                f"`auto_gate['min_fraction']` ({self.min_fraction!r}) must not exceed `auto_gate['max_fraction']` "
                f"({self.max_fraction!r})."
            )
        check_int("auto_gate['patience']", self.patience, 1)

    def window(self, num_steps: int) -> tuple[int, int]:
        """The earliest and the latest gate step a generation of ``num_steps`` steps may get."""
        earliest = min(num_steps, max(1, math.ceil(self.min_fraction * num_steps)))
        latest = min(num_steps, max(earliest, math.floor(self.max_fraction * num_steps + 0.5)))
        return earliest, latest


@dataclass(frozen=True)
class TgateSettings:
    """Validated T-GATE settings.

    ``gate_step`` is a step index (int, ``0 <= gate_step <= num_inference_steps``), a fraction
    of the steps actually run (float in (0, 1), rounded half up to a step, at least 1), or
    ``"auto"``: chosen per generation from the cross-attention outputs themselves (``auto_gate``).
    ``lcm`` is a hint that the pipeline runs without a CFG batch; ``None`` detects it. The
    detection always decides, so two different samples are never averaged together.
    """

    gate_step: int | float | str = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    lcm: bool | None = None
    auto_gate: AutoGate = AutoGate()

    @property
    def auto(self) -> bool:
        return self.gate_step == AUTO

    def __post_init__(self) -> None:
        gate = self.gate_step
        if not isinstance(self.auto_gate, AutoGate):
            raise TypeError(f"`auto_gate` must be an AutoGate, got {self.auto_gate!r}.")
        if isinstance(gate, str) and gate == AUTO:
            gate = 0.5  # validated as a fraction; what stands for it is chosen per generation
        if isinstance(gate, bool) or not isinstance(gate, numbers.Real):
            raise TypeError(
                f"`gate_step` must be an int step index >= 0, a float fraction in (0, 1) or 'auto', "
                f"got {gate!r} of type {type(gate).__name__}."
            )
        if isinstance(gate, numbers.Integral):
            if gate < 0:
                raise ValueError(f"`gate_step` must be an int step index >= 0 or a float fraction in (0, 1), got {gate!r}.")
        elif not (0.0 < float(gate) < 1.0) or math.isnan(float(gate)):
            raise ValueError(
                f"`gate_step` given as a float must be a fraction of the steps in (0, 1), got {gate!r}; "
                f"pass an int for a step index."
            )
        check_int("sp_interval", self.sp_interval, 1)
        check_int("fi_interval", self.fi_interval, 1)
        check_int("warm_up", self.warm_up, 0)
        if self.lcm is not None and not isinstance(self.lcm, bool):
            raise TypeError(f"`lcm` must be True, False or None, got {self.lcm!r}.")

    def updated(self, **changes) -> "TgateSettings":
        """A copy with the given fields replaced; ``None`` values keep the current ones (as the
        ``tgate`` package's arguments do: ``None`` is "not given")."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def resolve_gate_step(self, num_steps: int, *, beyond_allowed: bool = False) -> int:
        """The gate step as an index for a generation of ``num_steps`` solver steps (for ``"auto"``
        the latest it may be). An int gate step beyond them raises, unless ``beyond_allowed``
        (then no step is gated)."""
        check_int("num_inference_steps", num_steps, 1)
        gate = self.gate_step
        if gate == AUTO:
            return self.auto_gate.window(num_steps)[1]
        if isinstance(gate, numbers.Integral):
            if gate > num_steps and not beyond_allowed:
                raise ValueError(
                    f"`gate_step` must be between 0 and the number of steps run ({num_steps}), got {gate!r}."
                )
            return int(gate)
        return min(num_steps, max(1, math.floor(float(gate) * num_steps + 0.5)))


def plan_step(step: int, settings: TgateSettings, gate_step: int) -> StepPlan:
    """The plan of solver step ``step`` for a resolved ``gate_step``."""
    if step < gate_step - 1:
        if step < settings.warm_up:
            self_action = AttentionAction.COMPUTE
        elif step == settings.warm_up or step % settings.sp_interval == 0:
            self_action = AttentionAction.CACHE
        else:
            self_action = AttentionAction.REUSE
        return StepPlan(step, self_action, AttentionAction.COMPUTE, cfg_batch=True, average_cfg_halves=False)
    if step == gate_step - 1:
        return StepPlan(step, AttentionAction.CACHE, AttentionAction.CACHE, cfg_batch=True, average_cfg_halves=True)
    self_action = AttentionAction.CACHE if step % settings.fi_interval == 0 else AttentionAction.REUSE
    return StepPlan(step, self_action, AttentionAction.REUSE, cfg_batch=False, average_cfg_halves=False)


def candidate_plan(step: int) -> StepPlan:
    """A step of ``gate_step="auto"``'s window while no gate is chosen: everything is computed, and
    cached as at a gate step, so that the gate can fall right after it."""
    return StepPlan(step, AttentionAction.CACHE, AttentionAction.CACHE, cfg_batch=True, average_cfg_halves=True)


def plan_generation(settings: TgateSettings, num_steps: int) -> list[StepPlan]:
    """Plans of every step of a generation of ``num_steps`` solver steps (a fixed gate)."""
    if settings.auto:
        raise ValueError("`gate_step='auto'` is chosen during each generation: its plans cannot be listed in advance.")
    gate = settings.resolve_gate_step(num_steps)
    return [plan_step(c, settings, gate) for c in range(num_steps)]
