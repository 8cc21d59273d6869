"""Dropping classifier-free guidance after the gate, around each denoiser.

The pipeline still builds its guided inputs after the gate. For a batched call this hook runs the
denoiser on the rows of the parts that still run (:mod:`tgate_kernels.guided_arguments` knows
which inputs carry them) and lays the result out again for every part, so the pipeline's own
guidance arithmetic collapses to the kept part's prediction. For separate calls, the call of the
merged-away part is not run at all: it gets the kept call's result. No copy of any pipeline's
``__call__`` is needed.

The hook also tells the attention hooks which parts the running call carries, and it is stateful
for diffusers, which is how it receives the ``cache_context`` names pipelines open around
separate calls.
"""

from __future__ import annotations

from diffusers.hooks.hooks import BaseState, StateManager

from .. import _compat
from ..guided_arguments import GuidedArguments, spread_output
from ..recording import RecordedCall
from ..state import GenerationState
from .base import TgateHook


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class DenoiserHook(TgateHook):
    name = "tgate_denoiser"
    _is_stateful = True

    def __init__(self, state: GenerationState, denoiser_name: str, main: bool, arguments: GuidedArguments) -> None:
        super().__init__(state)
        self.denoiser = denoiser_name
        self.main = main
        self.arguments = arguments
        self.context = StateManager(_NoState)

    def reset_state(self, module):
        self.context.reset()
        return module

    def forward_in_generation(self, module, *args, **kwargs):
        state = self.state
        rows = self.arguments.rows(args, kwargs)
        if rows is None:
            return self.original(*args, **kwargs)
        guidance = state.guidance
        call = guidance.open_call(
            self.denoiser, self.main, rows, _compat.cache_context_name(self.context), after_gate=not state.plan.cfg_batch
        )
        if len(call.parts) > 1 and state.step == 0:
            self.arguments.check(args, kwargs, rows)
        rows_run = 0 if call.replay else rows * len(call.runs) // len(call.parts)
        if state.recorder is not None:
            state.recorder.denoiser_call(state.step, RecordedCall(self.denoiser, call.parts, call.runs, rows, rows_run))
        if call.replay:
            return guidance.replayed(self.denoiser)
        outer, state.call = state.call, call
        try:
            if call.cut:
                state.announce_cut()
                layout = guidance.layout
                args, kwargs = self.arguments.select(args, kwargs, call.parts, call.runs, layout.kept)
                output = spread_output(self.original(*args, **kwargs), rows_run, call.runs, call.parts)
            else:
                output = self.original(*args, **kwargs)
        finally:
            state.call = outer
        if call.keep_for_replay:
            guidance.keep_result(self.denoiser, output)
        return output
