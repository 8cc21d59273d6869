"""The public switch: ``enable(pipe)``, ``disable(pipe)``, ``enabled(pipe)``, ``is_enabled(pipe)``
and ``view(pipe)``.

Enabling an already enabled pipeline replaces its settings; it never stacks a second set of
hooks. Every argument is validated before anything is modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

from .config import TgateConfig
from .engine.configuration import enabled_with
from .engine.installation import configure, controller_of, remove
from .engine.pipeline_parts import check_pipeline, check_settings
from .loaders import tgate_call
from .view import TgateView


class _Default:
    """An option ``enable`` was not given (shown as its default value)."""

    def __init__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def enable(
    pipe,
    gate_step: int | float | str = _Default(10),
    sp_interval: int = _Default(5),
    fi_interval: int = _Default(1),
    warm_up: int = _Default(2),
    lcm: bool | None = _Default(None),
    deepcache: dict | bool | None = _Default(None),
    kernels: str = _Default("auto"),
    kept_part: str = _Default("auto"),
    compile: bool | dict = _Default(False),
    auto_gate: dict | None = _Default(None),
    gate_cache: str = _Default("mean"),
    guidance_after_gate: str = _Default("dropped"),
    *,
    config: TgateConfig | None = None,
):
    """Make the ordinary ``pipe(...)`` call run with T-GATE; returns ``pipe``.

    The options are :class:`~tgate_kernels.TgateConfig`'s (see it for each one), given one by
    one or as ``config=TgateConfig(...)``; options given beside ``config`` replace its values.
    ``deepcache=None`` (or not given) leaves DeepCache as it is on an enabled pipeline;
    ``False`` removes it. ``auto_gate`` is only for ``gate_step="auto"``.

    Calling ``enable`` on an enabled pipeline replaces its settings. Every argument is validated
    before anything is modified.
    """
    given = {
        name: value for name, value in dict(
            gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm,
            deepcache=deepcache, kernels=kernels, kept_part=kept_part, compile=compile, auto_gate=auto_gate,
            gate_cache=gate_cache, guidance_after_gate=guidance_after_gate,
        ).items() if not isinstance(value, _Default)
    }
    if config is not None and not isinstance(config, TgateConfig):
        raise TypeError(f"`config` must be a tgate_kernels.TgateConfig, got {config!r} of type {type(config).__name__}.")
    controller = controller_of(pipe)
    if given.get("deepcache") is None:
        given.pop("deepcache", None)
        if config is None and controller is not None and controller.configuration.gates_plain_calls:
            given["deepcache"] = controller.configuration.config.deepcache
    new = TgateConfig(**given) if config is None else dataclasses.replace(config, **given)
    check_pipeline(pipe)
    check_settings(pipe, new)
    configure(pipe, enabled_with(pipe, controller.configuration if controller else None, new), tgate_call)
    return pipe


def disable(pipe):
    """Remove every hook T-GATE attached to ``pipe``; returns ``pipe``. A no-op on a pipeline
    that is not enabled, and safe to call again after an interrupted ``disable``."""
    check_pipeline(pipe)
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
