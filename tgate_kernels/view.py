"""A read-only view of what T-GATE attached to a pipeline and what its last call did.

``tgate_kernels.view(pipe)`` is what tests, benchmarks and curious users read instead of the
controller's internals::

    view = tgate_kernels.view(pipe)
    view.attentions            # every hooked attention: denoiser, module name, kind
    with view.record() as record:
        pipe(prompt)
    record.computed(step=12, cross=True)   # 0 after the gate
    view.last_generation       # steps run, gate step, how the pipeline guided
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .config import CompileOptions, DeepCacheOptions, KernelMode, KeptPart, TgateConfig
from .engine.attention_modules import HookableAttention
from .engine.recording import StepRecorder

if TYPE_CHECKING:
    from .engine.installation import TgateController


@dataclass(frozen=True)
class HookedAttention(HookableAttention):
    """A hooked attention module and the denoiser (pipeline attribute) it belongs to."""

    denoiser: str = ""


class TgateView:
    """A read-only view of what T-GATE attached to a pipeline and of its last generation."""

    def __init__(self, controller: "TgateController") -> None:
        self._controller = controller

    @property
    def enabled(self) -> bool:
        """Whether the ordinary ``pipe(...)`` call runs with T-GATE (else only ``pipe.tgate``)."""
        return self._controller.configuration.gates_plain_calls

    @property
    def config(self) -> TgateConfig:
        """What plain ``pipe(...)`` calls run with on an enabled pipeline; on a pipeline only a
        loader attached, the defaults of ``pipe.tgate``."""
        configuration = self._controller.configuration
        return configuration.config if configuration.gates_plain_calls else configuration.tgate_call[0]

    @property
    def tgate_config(self) -> TgateConfig:
        """The defaults of ``pipe.tgate``: a loader's, else ``enable``'s."""
        return self._controller.configuration.tgate_call[0]

    settings = config
    """The former name of :attr:`config`."""
    tgate_settings = tgate_config
    """The former name of :attr:`tgate_config`."""

    @property
    def kernels(self) -> KernelMode:
        return self.config.kernels

    @property
    def kept_part(self) -> KeptPart:
        return self.config.kept_part

    @property
    def compile(self) -> CompileOptions | None:
        """The ``compile=`` options the denoisers run with (``None``: eagerly)."""
        return self.config.compile

    @property
    def deepcache(self) -> dict | None:
        """DeepCache's options for the calls :attr:`config` describes (``None``: without it)."""
        return _as_dict(self.config.deepcache)

    @property
    def tgate_deepcache(self) -> dict | None:
        """DeepCache's options for ``pipe.tgate`` calls (``None``: without it)."""
        return _as_dict(self.tgate_config.deepcache)

    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The hooked denoisers by pipeline attribute (``unet``, ``transformer_2``, ``controlnet``)."""
        return self._controller.parts.components()

    @property
    def attentions(self) -> tuple[HookedAttention, ...]:
        return tuple(
            HookedAttention(a.name, a.module, a.kind, denoiser=d.attribute)
            for d in self._controller.parts.denoisers
            for a in d.attentions
        )

    @property
    def fast_blocks(self) -> tuple[torch.nn.Module, ...]:
        """Transformer blocks that run the fused path after the gate (``kernels="auto"``)."""
        return tuple(self._controller.fast_blocks)

    @property
    def last_generation(self):
        """Steps, gate step and guidance of the last generation (``None`` before the first)."""
        return self._controller.state.last

    @contextlib.contextmanager
    def record(self) -> Iterator[StepRecorder]:
        """Record what the hooks do, per step, while the block runs (the last generation is kept)."""
        state = self._controller.state
        recorder = StepRecorder()
        outer, state.context.recorder = state.context.recorder, recorder
        try:
            yield recorder
        finally:
            state.context.recorder = outer


def _as_dict(options: DeepCacheOptions | None) -> dict | None:
    return None if options is None else dataclasses.asdict(options)
