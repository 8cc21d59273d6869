"""The public switch: ``enable(pipe)``, ``disable(pipe)``, ``enabled(pipe)``, ``is_enabled(pipe)``
and ``view(pipe)``.

Enabling an already enabled pipeline replaces its settings; it never stacks a second set of
hooks. Every argument is validated before anything is modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import replace
from typing import Iterator

from .families import registry as adapters
from .engine.installation import Configuration, configure, controller_of, remove
from .engine.compilation import CompileSettings
from .engine.deepcache import DeepCacheCoordinator
from .engine.guidance import KeptPart
from .config import KernelMode, choose
from .schedule import AutoGate, TgateSettings
from .view import TgateView


def enable(
    pipe,
    gate_step: int | float = 10,
    sp_interval: int = 5,
    fi_interval: int = 1,
    warm_up: int = 2,
    lcm: bool | None = None,
    deepcache: dict | bool | None = None,
    kernels: str = "auto",
    kept_part: str = "auto",
    compile: bool | dict = False,
    auto_gate: dict | None = None,
):
    """Make the ordinary ``pipe(...)`` call run with T-GATE; returns ``pipe``.

    Args:
        gate_step: the step from which cross-attention is reused and classifier-free guidance
            is dropped: an int step index in ``[0, num_inference_steps]``, a float fraction in
            (0, 1) of the steps the call runs (img2img's ``strength`` included), or ``"auto"``:
            chosen in each generation once the cross-attention outputs stop changing.
        sp_interval: self-attention caching interval before the gate (>= 1).
        fi_interval: self-attention caching interval after the gate (>= 1; 1 computes it every step).
        warm_up: steps before self-attention is first cached (>= 0).
        lcm: ``True`` for a pipeline without classifier-free guidance (LCM); ``None`` detects it.
            The detection decides either way, so two different samples are never averaged.
        deepcache: ``{"cache_interval": 3, "cache_branch_id": 0}`` runs DeepCache (its own
            ``DeepCacheSDHelper``) together with T-GATE on UNet pipelines; ``False`` removes it;
            ``None`` leaves it as it is.
        kernels: ``"auto"`` runs known transformer blocks after the gate as ``attn1`` → one fused
            op (``torch.ops.tgate.post_gate_residual_norm``) → feed-forward, skipping ``norm2`` and
            ``attn2``; ``"off"`` leaves every block to plain PyTorch (bit-exact with the reference).
        kept_part: which of the prompt and negative-prompt parts runs after the gate:
            ``"auto"`` (the reference's choice, see the README) or ``"conditional"``.
        compile: ``True`` compiles every denoiser with ``torch.compile``, T-GATE-aware (one set of
            graphs per input shape whatever the schedule; inductor with freezing), or a dict of
            ``backend``, ``mode``, ``freezing``, ``dynamic``, ``options``; ``False`` runs eagerly.
            ``disable`` restores the uncompiled modules.
        auto_gate: how ``gate_step="auto"`` chooses: ``{"threshold": 0.08, "min_fraction": 0.2,
            "max_fraction": 0.6, "patience": 2}`` (any of them; see ``tgate_kernels.AutoGate``).

    Calling ``enable`` on an enabled pipeline replaces its settings.
    """
    settings = TgateSettings(
        gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm,
        auto_gate=auto_gate_option(auto_gate),
    )
    if auto_gate is not None and not settings.auto:
        raise ValueError(f"`auto_gate` tells how gate_step='auto' chooses; it was given with gate_step={gate_step!r}.")
    kernel_mode = choose("kernels", kernels, KernelMode)
    kept = choose("kept_part", kept_part, KeptPart)
    compile_settings = CompileSettings.from_option(compile)
    adapters.check_pipeline(pipe)
    controller = controller_of(pipe)
    current = controller.configuration if controller is not None else Configuration(settings)
    coordinator = deepcache_option(pipe, deepcache, current.deepcache)
    configure(
        pipe,
        replace(
            current,
            settings=settings,
            kernels=kernel_mode,
            kept=kept,
            deepcache=coordinator,
            compile=compile_settings,
            gates_plain_calls=True,
        ),
    )
    return pipe


def auto_gate_option(option) -> AutoGate:
    """``auto_gate=`` validated: ``None`` (the defaults) or a dict of ``AutoGate``'s fields."""
    if option is None:
        return AutoGate()
    if isinstance(option, AutoGate):
        return option
    if not isinstance(option, dict):
        raise TypeError(f"`auto_gate` must be a dict like {{'threshold': 0.08, 'min_fraction': 0.2}}, got {option!r}.")
    allowed = {f.name for f in dataclasses.fields(AutoGate)}
    unknown = sorted(set(option) - allowed)
    if unknown:
        raise ValueError(f"`auto_gate` got unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}.")
    return AutoGate(**option)


def deepcache_option(pipe, option, current: DeepCacheCoordinator | None) -> DeepCacheCoordinator | None:
    """The DeepCache coordinator an ``enable``/loader option asks for, validated: ``None`` keeps
    ``current``, ``False`` none, a dict a new one."""
    if option is None:
        return current
    if option is False:
        return None
    return DeepCacheCoordinator.from_option(pipe, option)


def disable(pipe):
    """Remove every hook T-GATE attached to ``pipe``; returns ``pipe``. A no-op on a pipeline
    that is not enabled, and safe to call again after an interrupted ``disable``."""
    adapters.check_pipeline(pipe)
    remove(pipe)
    return pipe


def is_enabled(pipe) -> bool:
    """Whether the ordinary ``pipe(...)`` call runs with T-GATE."""
    controller = controller_of(pipe)
    return controller is not None and controller.configuration.gates_plain_calls


def view(pipe) -> TgateView | None:
    """A read-only view of what T-GATE attached to ``pipe`` and did in its last call (``None``
    when T-GATE is not attached)."""
    controller = controller_of(pipe)
    return None if controller is None else TgateView(controller)


@contextlib.contextmanager
def enabled(pipe, **settings) -> Iterator:
    """``with tgate_kernels.enabled(pipe, gate_step=10): pipe(...)``; on exit the pipeline is as
    it was before (disabled, or enabled with its previous settings)."""
    controller = controller_of(pipe)
    previous = controller.configuration if controller is not None else None
    enable(pipe, **settings)
    try:
        yield pipe
    finally:
        if previous is None:
            disable(pipe)
        elif controller_of(pipe) is controller:  # unless the body disabled it itself
            controller.apply(previous)
