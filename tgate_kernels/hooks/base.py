"""The base of every T-GATE hook."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from diffusers.hooks import ModelHook

from .. import _compat
from ..engine.generation import GenerationState


PICKLE_REFUSAL = (
    "a pipeline (or module) with T-GATE hooks cannot be pickled or saved whole with torch.save (the hooks drive this "
    "process's generations): save the weights (`pipe.save_pretrained(...)`, `module.state_dict()`), or call "
    "tgate_kernels.disable(pipe) first, save, then enable again."
)

COPY_REFUSAL = (
    "a pipeline (or module) with T-GATE hooks cannot be deep-copied (the copy's hooks would drive the original's "
    "generation): call tgate_kernels.disable(pipe) first, copy, then enable each pipeline."
)


@dataclass(frozen=True)
class InstallRecord:
    """What attaching a hook changed on its module, so that taking it out restores exactly that.

    ``forward`` is the ``module.forward`` the registry installed for this hook; ``own`` is the
    registry's reference to this hook's ``new_forward``.
    """

    had_registry: bool
    had_forward: bool
    forward: Callable
    own: Callable


class TgateHook(ModelHook):
    """A diffusers ``ModelHook`` that passes every call straight through unless a generation of
    its pipeline runs in the calling thread; then :meth:`forward_in_generation` decides."""

    name: ClassVar[str]

    def __init__(self, state: GenerationState) -> None:
        super().__init__()
        self.state = state
        self.installed: InstallRecord | None = None

    def new_forward(self, module, *args, **kwargs):
        # whether a generation runs in this thread (compiled code is traced in it), asked inline:
        # every call of every hooked module pays for it
        state = self.state
        if state.plan is not None and (torch.compiler.is_compiling() or state.owner == threading.get_ident()):
            return self.forward_in_generation(module, *args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def forward_in_generation(self, module, *args, **kwargs):
        raise NotImplementedError

    def original(self, *args, **kwargs):
        """The module's forward below this hook."""
        return self.fn_ref.original_forward(*args, **kwargs)

    def detached(self, module) -> None:
        """Called when the hook is taken off its module."""

    def __deepcopy__(self, memo):
        raise TypeError(COPY_REFUSAL)

    def __reduce_ex__(self, protocol):
        raise TypeError(PICKLE_REFUSAL)


_compat.diffusers_hook(TgateHook, stateful=False)
