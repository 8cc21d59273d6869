"""T-GATE-aware compilation of a pipeline's denoisers (``enable(pipe, compile=True)``).

Compiling a denoiser whole would bake each step's plan into the graph (compute this attention,
reuse that one), so a schedule would compile one graph per distinct plan, each holding its own
copy of the weights once inductor freezes them. Instead the plan reaches the graph as data
(:mod:`tgate_kernels.engine.plan_data`): the denoiser's forward is compiled below T-GATE's denoiser hook,
which cuts the guided batch, and one graph serves every step of a phase, so there is one graph per
denoiser input shape (the guided batch before the gate, the cut one after it).

Inductor with ``freezing`` (weights folded into the graph, prepacked for oneDNN on a CPU) is the
default on every device; plain inductor is no faster than eager on a CPU. ``mode`` (e.g.
``"max-autotune"`` on CUDA) adds inductor's settings of that mode. A backend or mode that does
not exist is refused by ``enable``; any failure while compiling (no C++ compiler, a backend that
breaks) falls back to eager with one warning naming the cause.

A denoiser is compiled whole (``fullgraph``): the step's tensors enter the graph as inputs of its
first frame only, so a graph break inside the denoiser (Lumina 2's transformer reads its text
lengths to the host) would leave the graphs after it reading them as attributes, folded or
guarded by identity, and a later generation would reuse the first one's caches. Such a denoiser
runs eagerly instead, with the warning.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable

import torch

from .. import _compat
from ..config import CompileOptions

def compile_arguments(options: CompileOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of ``torch.compile`` for a denoiser, and the inductor settings to hold
    while it runs. Freezing has to be set while dynamo traces, not only while inductor compiles
    (``torch.compile(options=...)`` sets it too late: dynamo then passes the weights as inputs,
    which cannot be frozen), so inductor's settings are held around every call instead of passed
    as ``options``."""
    if options.backend != "inductor":
        return dict(
            backend=options.backend, mode=options.mode, dynamic=options.dynamic, options=options.options or None, fullgraph=True,
        ), {}
    settings = _compat.inductor_mode_settings(options.mode)
    settings["freezing"] = True if options.freezing is None else options.freezing
    settings.update(options.options)
    return dict(backend="inductor", dynamic=options.dynamic, fullgraph=True), settings


class CompiledForward:
    """A denoiser's forward, compiled on first use, eager again (with one warning) if compiling fails.

    It is called with the step's tensors first (:attr:`tgate_kernels.engine.plan_data.PlanData.bound`):
    the compiled function stores them where the attention hooks read them, so that they enter
    the graph as its inputs, not as constants of it."""

    def __init__(self, forward: Callable, options: CompileOptions, name: str, plan_data) -> None:
        self.eager = forward
        self.options = options
        self.name = name
        self.plan_data = plan_data
        self.failure: str | None = None
        self._compiled: Callable | None = None
        self._inductor_settings: dict[str, Any] = {}
        # dynamo keeps its graphs, and counts them against its recompile limit, per code object:
        # each denoiser gets a code object of its own, so that many compiled denoisers in one
        # process (several pipelines) never push one another past that limit into eager mode
        code = CompiledForward._forward_with.__code__.replace()
        self._forward_with = types.MethodType(types.FunctionType(code, CompiledForward._forward_with.__globals__), self)

    def _forward_with(self, tensors: dict, args: tuple, kwargs: dict):
        self.plan_data.bound = tensors
        return self.eager(*args, **kwargs)

    def __call__(self, tensors: dict, *args, **kwargs):
        if self.failure is None:
            try:
                if self._compiled is None:
                    compile_kwargs, self._inductor_settings = compile_arguments(self.options)
                    self._compiled = torch.compile(self._forward_with, **compile_kwargs)
                with _compat.inductor_settings(self._inductor_settings):
                    return self._compiled(tensors, args, kwargs)
            except _compat.compiler_errors() as error:
                self.failure = _cause(error)
                warnings.warn(
                    f"torch.compile of {self.name} failed ({self.failure}); T-GATE runs it eagerly instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self._forward_with(tensors, args, kwargs)


def _cause(error: BaseException) -> str:
    """The compiler error and what caused it, on one line."""
    cause = getattr(error, "inner_exception", None) or error.__cause__
    text = f"{type(error).__name__}" + (f" from {type(cause).__name__}: {cause}" if cause is not None else f": {error}")
    return " ".join(text.split())[:300]
