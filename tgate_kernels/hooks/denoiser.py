"""Dropping classifier-free guidance after the gate, around each denoiser.

The pipeline still builds its guided inputs after the gate. For a batched call this hook runs the
denoiser on the rows of the parts that still run (:mod:`tgate_kernels.engine.guided_arguments` knows
which inputs carry them) and lays the result out again for every part, so the pipeline's own
guidance arithmetic collapses to the kept part's prediction. For separate calls, the call of the
merged-away part is not run at all: it gets the kept call's result. No copy of any pipeline's
``__call__`` is needed.

The hook also tells the attention hooks which parts the running call carries, and it is stateful
for diffusers, which is how it receives the ``cache_context`` names pipelines open around
separate calls.
"""

from __future__ import annotations

import torch

from .. import _compat
from ..config import CompileOptions
from ..engine.compilation import CompiledForward
from ..engine.guidance import Mode
from ..engine.guided_arguments import GuidedArguments, spread_output
from ..engine.recording import RecordedCall
from ..engine.generation import GenerationState
from .base import TgateHook


class DenoiserHook(TgateHook):
    name = "tgate_denoiser"

    def __init__(self, state: GenerationState, denoiser_name: str, main: bool, arguments: GuidedArguments) -> None:
        super().__init__(state)
        self.denoiser = denoiser_name
        self.main = main
        self.arguments = arguments
        self.cache_context = _compat.cache_context_receiver()
        self.compiled: CompiledForward | None = None
        """The denoiser's forward compiled below this hook (``enable(pipe, compile=...)``)."""
        self._layout_tensors: dict[tuple, dict] = {}
        """Per layout of a compiled call, the tensors (caches and flags) its graph takes."""
        self._arguments_checked = False
        """Whether this generation's first guided call was checked for arguments T-GATE cannot cut."""

    def _run(self, call, args: tuple, kwargs: dict):
        """The denoiser's forward on (cut) arguments: eager, or compiled with the plan as data."""
        if self.compiled is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        self.compile(self.compiled.options)  # anew only if the chain below was rewired
        state = self.state
        layout = state.guidance.layout
        data = state.context.plan_data
        sample = args[0] if args else kwargs[self.arguments.sample]
        first_part = layout is None or layout.mode is not Mode.SEPARATE or call.parts[0] == layout.parts[0]
        data.prepare(self.denoiser, state.plan, first_part, sample.device)
        key = (data.after_gate, data.cross_ready(self.denoiser), state.reuse_fills_cache, call.parts, call.runs,
               tuple(sample.shape), sample.dtype, sample.device)
        specs = self._layout_tensors.get(key)
        try:
            if specs is None:
                # the first call of each layout runs eagerly: it makes the tensors the graph takes
                data.bind_for_learning(sample.device, call.run)
                output = self.fn_ref.original_forward(*args, **kwargs)
                self._layout_tensors[key] = data.learned(call.run)
            else:
                output = self.compiled(data.bind(specs, call.run), *args, **kwargs)
        finally:
            data.bound = None
        data.finished(self.denoiser, state.plan, state.reuse_fills_cache)
        return output

    def compile(self, options: CompileOptions | None) -> None:
        """Compile the forward below this hook with ``options`` (``None``: eager). Compiling
        again with the same options keeps the compiled graphs."""
        if options is None:
            self.compiled = None
        elif self.compiled is None or self.compiled.options != options or self.compiled.eager is not self.fn_ref.original_forward:
            self.compiled = CompiledForward(self.fn_ref.original_forward, options, self.denoiser, self.state.context.plan_data)

    def reset_state(self, module):
        self.cache_context.reset()
        self._arguments_checked = False
        self.arguments.reset()
        return module

    def forward_in_generation(self, module, *args, **kwargs):
        state = self.state
        rows = self.arguments.rows(args, kwargs)
        if rows is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        guidance = state.guidance
        call = guidance.open_call(
            self.denoiser, self.main, rows, _compat.cache_context_name(self.cache_context), after_gate=not state.plan.cfg_batch,
            # a user's torch.compile of the whole denoiser traces this hook: dynamo cannot read a
            # tensor's memory, so its calls of a step are not told apart by timestep there
            timestep=None if torch.compiler.is_compiling() else self.arguments.timestep(args, kwargs),
        )
        layout = guidance.layout
        if (layout is not None and layout.mode is Mode.SEPARATE and not call.replay and state.step == 0
                and not torch.compiler.is_compiling()):
            self.arguments.compare_separate_calls(call.parts[0], args, kwargs)
        if len(call.parts) > 1 and not self._arguments_checked:
            # each denoiser's first guided call, whenever it comes (a ControlNet may start late)
            self.arguments.check(args, kwargs, rows)
            self._arguments_checked = True
        rows_run = 0 if call.replay else rows * len(call.runs) // len(call.parts)
        if state.context.recorder is not None:
            state.context.recorder.denoiser_call(state.step, RecordedCall(self.denoiser, call.parts, call.runs, rows, rows_run))
        if call.replay:
            return guidance.replayed(call)
        outer, state.context.call = state.context.call, call
        try:
            if call.cut:
                state.announce_cut()
                layout = guidance.layout
                args, kwargs = self.arguments.select(args, kwargs, call.parts, call.runs, layout.kept)
                output = spread_output(self._run(call, args, kwargs), rows_run, call.runs, call.parts)
            else:
                output = self._run(call, args, kwargs)
        finally:
            state.context.call = outer
        if call.keep_for_replay:
            guidance.keep_result(call, output)
        return output

_compat.diffusers_hook(DenoiserHook, stateful=True)
