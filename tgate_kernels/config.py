"""One T-GATE configuration: :class:`TgateConfig`, frozen, validated once, serialisable.

``enable``, the loaders, ``pipe.tgate``, the command line, the benchmarks and the quality runs all
build a ``TgateConfig`` and pass it on; a job's ``run.json`` stores :meth:`TgateConfig.to_dict`.
Every bad value gets the same kind of error, raised when the config is built: a ``TypeError`` for
a value of the wrong type, a ``ValueError`` for one out of range or a combination that does not
work, each naming the argument, the value and what is allowed.

Pure Python: nothing here imports torch (a backend name given to ``compile`` is checked against
torch's list when the config is built).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

Choice = TypeVar("Choice", bound=enum.Enum)

AUTO = "auto"


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def choose(name: str, value, choices: type[Choice]) -> Choice:
    """``value`` as a member of ``choices``, given as the member or its string value."""
    try:
        return choices(value)
    except ValueError:
        allowed = tuple(member.value for member in choices)
        meanings = "; ".join(f"{member.value!r}: {member.__doc__}" for member in choices if member.__doc__)
        raise ValueError(f"`{name}` must be one of {allowed} ({meanings}), got {value!r}.") from None


def _fields_of(cls, name: str, option, example: str) -> dict:
    """``option`` (a dict of ``cls``'s fields) checked for its type and unknown keys."""
    if not isinstance(option, dict):
        raise TypeError(f"`{name}` must be a dict like {example}, got {option!r} of type {type(option).__name__}.")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(option) - set(allowed))
    if unknown:
        raise ValueError(f"`{name}` got unknown keys {unknown}; allowed: {', '.join(map(repr, allowed))}.")
    return option


class _DocumentedChoice(str, enum.Enum):
    def __new__(cls, value: str, doc: str = ""):
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member


class KernelMode(_DocumentedChoice):
    """How transformer blocks run after the gate."""

    AUTO = ("auto", "blocks fused after the gate, with the best kernel available")
    OFF = ("off", "plain PyTorch, bit-exact with the reference")


class KeptPart(_DocumentedChoice):
    """Which of the prompt and negative-prompt parts runs after the gate."""

    AUTO = ("auto", "the reference's choice: the negative prompt for batched guidance, the conditional part for SVD, ControlNet guess mode and separate calls")
    CONDITIONAL = ("conditional", "the prompt's part")


class GateCache(_DocumentedChoice):
    """What the gate step caches of the prompt's and the negative prompt's outputs, which the
    steps after it reuse."""

    MEAN = ("mean", "their mean, as the reference caches cross-attention")
    KEPT_PART = ("kept-part", "the output of the part that runs after the gate (kept_part) alone")


class GuidanceAfterGate(_DocumentedChoice):
    """What becomes of classifier-free guidance after the gate."""

    DROPPED = ("dropped", "the reference: one part runs, so a step after the gate costs about half")
    KEPT = ("kept", "every part still runs, each reusing what it cached itself at the gate: the text frozen, guidance kept (a step costs what it did, less the frozen text's work)")


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

    @classmethod
    def from_option(cls, option) -> "AutoGate":
        """``auto_gate=`` as users give it: ``None`` (the defaults), an ``AutoGate`` or a dict of its fields."""
        if option is None or isinstance(option, AutoGate):
            return option or cls()
        return cls(**_fields_of(cls, "auto_gate", option, "{'threshold': 0.08, 'min_fraction': 0.2}"))

    def window(self, num_steps: int) -> tuple[int, int]:
        """The earliest and the latest gate step a generation of ``num_steps`` steps may get."""
        earliest = min(num_steps, max(1, math.ceil(self.min_fraction * num_steps)))
        latest = min(num_steps, max(earliest, math.floor(self.max_fraction * num_steps + 0.5)))
        return earliest, latest


@dataclass(frozen=True)
class DeepCacheOptions:
    """DeepCache beside T-GATE on UNet pipelines: deep features reused on all but every
    ``cache_interval``-th step, branching at ``cache_branch_id``."""

    cache_interval: int = 3
    cache_branch_id: int = 0

    def __post_init__(self) -> None:
        check_int("deepcache['cache_interval']", self.cache_interval, 1)
        check_int("deepcache['cache_branch_id']", self.cache_branch_id, 0)

    @classmethod
    def from_option(cls, option) -> "DeepCacheOptions | None":
        """``deepcache=`` as users give it: ``None``/``False`` (none), ``True`` (the defaults), a
        ``DeepCacheOptions`` or a dict of its fields."""
        if option is None or option is False:
            return None
        if option is True or isinstance(option, DeepCacheOptions):
            return cls() if option is True else option
        return cls(**_fields_of(cls, "deepcache", option, "{'cache_interval': 3, 'cache_branch_id': 0}"))


_COMPILE_TYPES = {
    "backend": ("a backend name or a callable", lambda v: isinstance(v, str) or callable(v)),
    "mode": ("None or a mode name", lambda v: v is None or isinstance(v, str)),
    "freezing": ("None, True or False", lambda v: v is None or isinstance(v, bool)),
    "dynamic": ("None, True or False", lambda v: v is None or isinstance(v, bool)),
    "options": ("a dict of inductor settings", lambda v: isinstance(v, dict)),
}


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` of the denoisers, T-GATE-aware; ``freezing=None`` is inductor's freezing on."""

    backend: Any = "inductor"
    mode: str | None = None
    freezing: bool | None = None
    dynamic: bool | None = False
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, (allowed, check) in _COMPILE_TYPES.items():
            value = getattr(self, key)
            if not check(value):
                raise TypeError(f"`compile['{key}']` must be {allowed}, got {value!r} of type {type(value).__name__}.")
        from . import _compat  # torch's lists of backends and modes, read only when compiling is asked for

        if isinstance(self.backend, str) and self.backend not in _compat.compile_backends():
            raise ValueError(f"`compile['backend']` {self.backend!r} is not a torch.compile backend; "
                             f"allowed: {', '.join(_compat.compile_backends(debugging=False))} or a callable.")
        if self.mode is not None and self.mode not in _compat.compile_modes():
            raise ValueError(f"`compile['mode']` {self.mode!r} is not a torch.compile mode; allowed: {', '.join(_compat.compile_modes())}.")

    @classmethod
    def from_option(cls, option) -> "CompileOptions | None":
        """``compile=`` as users give it: ``True``/``False``/``None``, a ``CompileOptions`` or a dict of its fields."""
        if option is None or option is False:
            return None
        if option is True or isinstance(option, CompileOptions):
            return cls() if option is True else option
        if not isinstance(option, dict):
            raise TypeError(
                f"`compile` must be True, False or a dict with some of {[f.name for f in dataclasses.fields(cls)]} "
                f"(e.g. {{'mode': 'max-autotune'}}), got {option!r} of type {type(option).__name__}."
            )
        return cls(**_fields_of(cls, "compile", option, "{'mode': 'max-autotune'}"))


@dataclass(frozen=True)
class TgateConfig:
    """What T-GATE runs with.

    Args:
        gate_step: the step from which cross-attention is reused and classifier-free guidance is
            dropped: an int step index in ``[0, num_inference_steps]``, a float fraction in (0, 1)
            of the steps the call runs (img2img's ``strength`` included, rounded half up, at least
            1), or ``"auto"``: chosen in each generation once the cross-attention outputs stop
            changing (``auto_gate``).
        sp_interval: self-attention caching interval before the gate (>= 1).
        fi_interval: self-attention caching interval after the gate (>= 1; 1 computes it every step).
        warm_up: steps before self-attention is first cached (>= 0).
        lcm: ``True`` for a pipeline without classifier-free guidance (LCM); ``None`` detects it.
            The detection decides either way, so two different samples are never averaged.
        auto_gate: how ``gate_step="auto"`` chooses (:class:`AutoGate`, or a dict of its fields);
            only with ``gate_step="auto"`` (``None``: the defaults).
        deepcache: DeepCache beside T-GATE on UNet pipelines (:class:`DeepCacheOptions`, a dict of
            its fields, ``True`` for its defaults), or ``None``.
        kernels: ``"auto"`` runs known transformer blocks after the gate as ``attn1`` -> one fused
            op -> feed-forward, skipping ``norm2`` and ``attn2``; ``"off"`` leaves every block to
            plain PyTorch (bit-exact with the reference).
        kept_part: which of the prompt and negative-prompt parts runs after the gate: ``"auto"``
            (the reference's choice) or ``"conditional"``.
        compile: ``torch.compile`` of every denoiser, T-GATE-aware (:class:`CompileOptions`, a dict
            of its fields, ``True`` for inductor with freezing), or ``None`` for eager.
        gate_cache: what the gate step caches for the steps after it, of the prompt's and the
            negative prompt's outputs of every attention it caches (cross-attention, a joint
            attention's text stream, self-attention): ``"mean"`` (the reference) or
            ``"kept-part"`` (the part that runs after the gate keeps its own).
        guidance_after_gate: ``"dropped"`` (the reference: the kept part alone runs after the
            gate) or ``"kept"`` (every guidance part still runs after the gate, each reusing its
            own cross-attention or text stream as it cached it at the gate, so the guidance
            scale keeps acting: freezing the text without dropping the guidance, to tell their
            effects apart; not with ``gate_step="auto"`` or ``compile``).

    Options may be given in any of the spellings above; the config holds them normalised, so two
    spellings of one setting make equal configs.
    """

    gate_step: int | float | str = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    lcm: bool | None = None
    auto_gate: AutoGate | None = None
    deepcache: DeepCacheOptions | None = None
    kernels: KernelMode = KernelMode.AUTO
    kept_part: KeptPart = KeptPart.AUTO
    compile: CompileOptions | None = None
    gate_cache: GateCache = GateCache.MEAN
    guidance_after_gate: GuidanceAfterGate = GuidanceAfterGate.DROPPED

    def __post_init__(self) -> None:
        normalised = dict(
            gate_step=_gate_step(self.gate_step),
            auto_gate=None if self.auto_gate is None else AutoGate.from_option(self.auto_gate),
            deepcache=DeepCacheOptions.from_option(self.deepcache),
            kernels=choose("kernels", self.kernels, KernelMode),
            kept_part=choose("kept_part", self.kept_part, KeptPart),
            compile=CompileOptions.from_option(self.compile),
            gate_cache=choose("gate_cache", self.gate_cache, GateCache),
            guidance_after_gate=choose("guidance_after_gate", self.guidance_after_gate, GuidanceAfterGate),
        )
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        check_int("sp_interval", self.sp_interval, 1)
        check_int("fi_interval", self.fi_interval, 1)
        check_int("warm_up", self.warm_up, 0)
        if self.lcm is not None and not isinstance(self.lcm, bool):
            raise TypeError(f"`lcm` must be True, False or None, got {self.lcm!r}.")
        if self.deepcache is not None and self.compile is not None:
            raise ValueError(
                "`compile` does not combine with `deepcache`: DeepCache's wrappers decide per step inside the compiled "
                "region. Use one of them."
            )
        if self.auto_gate is not None and not self.auto:
            raise ValueError(f"`auto_gate` tells how `gate_step='auto'` chooses; it was given with `gate_step={self.gate_step!r}`.")
        if self.guidance_after_gate is GuidanceAfterGate.KEPT:
            clashes = (("gate_step", "'auto'", "the auto gate", self.auto), ("compile", "given", "the compiled path", self.compile is not None))
            for name, given, path, clashing in clashes:
                if clashing:
                    raise ValueError(
                        f"`guidance_after_gate='kept'` does not combine with `{name}` ({given}): every part keeps its own "
                        f"cache after the gate, which {path} does not keep. Use guidance_after_gate='dropped', or a fixed "
                        f"gate_step without compile."
                    )
        for other in ("deepcache", "compile"):
            if self.auto and getattr(self, other) is not None:
                raise ValueError(
                    f"`gate_step='auto'` does not combine with `{other}`: it watches every cross-attention output until "
                    f"the gate, which {'DeepCache skips' if other == 'deepcache' else 'a compiled graph does not show'}. "
                    f"Use a fixed `gate_step`."
                )

    @property
    def auto(self) -> bool:
        return self.gate_step == AUTO

    @property
    def auto_gate_options(self) -> AutoGate:
        """How ``gate_step="auto"`` chooses (the defaults when ``auto_gate`` was not given)."""
        return self.auto_gate or AutoGate()

    def updated(self, **changes) -> "TgateConfig":
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
            return self.auto_gate_options.window(num_steps)[1]
        if isinstance(gate, int):
            if gate > num_steps and not beyond_allowed:
                raise ValueError(f"`gate_step` must be between 0 and the number of steps run ({num_steps}), got {gate!r}.")
            return gate
        return min(num_steps, max(1, math.floor(gate * num_steps + 0.5)))

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The config as plain JSON values; ``TgateConfig.from_dict`` reads it back (a callable
        ``compile`` backend has no such form and is refused)."""
        if self.compile is not None and not isinstance(self.compile.backend, str):
            raise ValueError(f"a config with a callable `compile['backend']` ({self.compile.backend!r}) cannot be serialised.")
        return {
            "gate_step": self.gate_step,
            "sp_interval": self.sp_interval,
            "fi_interval": self.fi_interval,
            "warm_up": self.warm_up,
            "lcm": self.lcm,
            "auto_gate": None if self.auto_gate is None else dataclasses.asdict(self.auto_gate),
            "deepcache": None if self.deepcache is None else dataclasses.asdict(self.deepcache),
            "kernels": self.kernels.value,
            "kept_part": self.kept_part.value,
            "compile": None if self.compile is None else dataclasses.asdict(self.compile),
            "gate_cache": self.gate_cache.value,
            "guidance_after_gate": self.guidance_after_gate.value,
        }

    @classmethod
    def from_dict(cls, values: dict) -> "TgateConfig":
        return cls(**_fields_of(cls, "config", values, "TgateConfig().to_dict()"))


def _gate_step(gate):
    """``gate_step`` validated: an int >= 0, a float fraction in (0, 1) or ``"auto"``."""
    if isinstance(gate, str) and gate == AUTO:
        return AUTO
    if isinstance(gate, bool) or not isinstance(gate, numbers.Real):
        raise TypeError(
            f"`gate_step` must be an int step index >= 0, a float fraction in (0, 1) or 'auto', "
            f"got {gate!r} of type {type(gate).__name__}."
        )
    if isinstance(gate, numbers.Integral):
        if gate < 0:
            raise ValueError(f"`gate_step` must be an int step index >= 0 or a float fraction in (0, 1), got {gate!r}.")
        return int(gate)
    if math.isnan(float(gate)) or not 0.0 < float(gate) < 1.0:
        raise ValueError(
            f"`gate_step` given as a float must be a fraction of the steps in (0, 1), got {gate!r}; "
            f"pass an int for a step index."
        )
    return float(gate)
