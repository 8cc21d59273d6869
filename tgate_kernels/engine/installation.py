"""Installing T-GATE on one pipeline, as one transaction, and taking it off again.

One :class:`TgateController` per pipeline, kept in the pipeline's ``__dict__``. It installs the
hooks (each a no-op outside a generation), applies a :class:`~.configuration.Configuration`, and
takes every hook out again. Installing is all or nothing; uninstalling is idempotent, so an
interrupted ``disable()`` completes when it runs again. Before each generation the
:mod:`.guards` keep the hooks attached when others rewire the pipeline.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch

from .. import _compat
from ..config import KernelMode, TgateConfig
from ..families.registry import says_guided, uses_perturbed_attention
from . import guards
from .attention_modules import AttentionKind
from .autogate import AutoGateListener
from .configuration import Configuration
from .deepcache import DeepCacheCoordinator
from .guided_arguments import GuidedArguments
from ..hooks.attention_cache import AttentionCacheHook, JointAttentionCacheHook
from ..hooks.base import COPY_REFUSAL, PICKLE_REFUSAL, TgateHook
from ..hooks.block_fast_path import BlockFastPathHook, supports_fast_path
from ..hooks.denoiser import DenoiserHook
from ..hooks.pipeline_loop import GenerationTracker, Opening
from ..hooks.registry import attach, attached, detach
from ..hooks.text_rows import TextRowsHook, text_mask_taps
from .generation import GenerationState
from .pag import PagAfterGate
from .pipeline_parts import check_pipeline, components, guidance_tracker, pipeline_parts
from .snapshot import InstanceAttributes

_CONTROLLER_ATTR = "_tgate_controller"


class TgateController:
    """Everything T-GATE attached to one pipeline: its hooks, its configuration and the state of
    the generation running; installs, reconfigures and removes them as one."""

    def __init__(self, pipe, configuration: Configuration, tgate_call: Callable) -> None:
        self.parts = pipeline_parts(pipe)
        check_pipeline(pipe, runs=True)
        self.pipe = pipe
        self.configuration = configuration
        self.state = GenerationState(guidance_tracker(pipe, self.parts, configuration.config.kept_part))
        self._tgate_call = tgate_call
        """``pipe.tgate``: the pipeline's call with T-GATE settings (:mod:`tgate_kernels.loaders`)."""
        self._one_call: TgateConfig | None = None
        self._active_deepcache: DeepCacheCoordinator | None = None
        """The DeepCache coordinator following the generation that runs (or ran last)."""
        self._tracker = GenerationTracker(pipe, self.state, self._opening)
        self._hooks: list[tuple[torch.nn.Module, TgateHook]] = []
        self._fast_blocks: list[torch.nn.Module] = []
        self._components: dict[str, int] = {}
        self._pipe_tgate: InstanceAttributes | None = None
        self._auto_gate = AutoGateListener()
        self._pag = PagAfterGate([d.module for d in self.parts.denoisers]) if uses_perturbed_attention(pipe) else None

    # -- installing ------------------------------------------------------------------------

    def install(self) -> None:
        """Attach every hook; on any failure (or interrupt) nothing stays attached."""
        guards.refuse_foreign_caches(self.parts, ValueError)
        for denoiser in self.parts.denoisers:
            if attached(denoiser.module, DenoiserHook.name) is not None:
                raise ValueError(
                    f"`pipe` shares its {type(denoiser.module).__name__} (`{denoiser.attribute}`) with another "
                    f"pipeline T-GATE is enabled on (pipelines made with `from_pipe` or from another's components "
                    f"do); disable that one first."
                )
        try:
            plan_as_data = self.configuration.config.compile is not None
            interleaved = self.parts.family.interleaved
            for denoiser in self.parts.denoisers:
                arguments = GuidedArguments(denoiser.module, interleaved)
                hook = DenoiserHook(self.state, denoiser.attribute, denoiser.main, arguments)
                self._attach(denoiser.module, hook)
                self.state.add_stateful_hook(hook)
                layouts = [a.single_stream for a in denoiser.attentions if a.single_stream is not None]
                for module, tap in text_mask_taps(self.state, denoiser.module, layouts):
                    self._attach(module, tap)
                for attention in denoiser.attentions:
                    if attention.single_stream is not None:
                        cache = TextRowsHook(
                            self.state, denoiser.attribute, attention.module, attention.single_stream,
                            plan_as_data, attention.name,
                        )
                        for module, tap in cache.taps(attention.module):
                            self._attach(module, tap)
                    elif attention.kind is AttentionKind.JOINT:
                        cache = JointAttentionCacheHook(self.state, denoiser.attribute, plan_as_data, attention.name)
                    else:
                        cache = AttentionCacheHook(
                            self.state, denoiser.attribute, attention.cross, plan_as_data, attention.name,
                            text_stream=attention.kind is AttentionKind.TEXT,
                        )
                    self._attach(attention.module, cache)
                    self.state.add_stateful_hook(cache)
            self.state.add_listener(self._auto_gate)
            if self._pag is not None:
                self.state.add_listener(self._pag)
            self._tracker.install()
            self._pipe_tgate = InstanceAttributes([self.pipe], "tgate")
            self.pipe.tgate = types.MethodType(self._tgate_call, self.pipe)
            self._components = self._component_ids()
            self.apply(self.configuration)
            for denoiser in self.parts.denoisers:
                _compat.invalidate_child_registries(denoiser.module)
        except BaseException:
            self.uninstall()
            raise

    def _attach(self, module: torch.nn.Module, hook: TgateHook) -> None:
        attach(module, hook)
        self._hooks.append((module, hook))

    def uninstall(self) -> None:
        """Remove everything ``install`` attached; safe on a partial install, and to run again."""
        self._tracker.uninstall()
        self._activate_deepcache(None)
        self.state.remove_listener(self._auto_gate)
        if self._pag is not None:
            self.state.remove_listener(self._pag)
        self._set_fast_blocks(False)
        while self._hooks:
            module, hook = self._hooks[-1]
            detach(module, hook.name)
            self.state.remove_stateful_hook(hook)
            self._hooks.pop()
        if self._pipe_tgate is not None:
            self._pipe_tgate.restore()
            self._pipe_tgate = None
        for denoiser in self.parts.denoisers:
            _compat.invalidate_child_registries(denoiser.module)

    def __deepcopy__(self, memo):
        raise TypeError(COPY_REFUSAL)

    def __reduce_ex__(self, protocol):
        raise TypeError(PICKLE_REFUSAL)

    # -- configuration ---------------------------------------------------------------------

    def apply(self, configuration: Configuration) -> None:
        """Run with ``configuration`` from the next call on (validated by whoever built it)."""
        config = configuration.config
        if (config.compile is None) != (self.configuration.config.compile is None) and self._hooks:
            # compiled or not decides how every hook is built: build them again
            self._reinstall(configuration)
            return
        self._activate_deepcache(None)
        # under torch.compile inductor fuses the plain residual additions and LayerNorm itself,
        # which measured faster than calling the opaque fused op (bench/RESULTS.md)
        self._set_fast_blocks(config.kernels is KernelMode.AUTO and config.compile is None)
        self.state.guidance.kept_part = config.kept_part
        for module, hook in self._hooks:
            if isinstance(hook, DenoiserHook):
                hook.compile(config.compile)
        self.configuration = configuration

    def _activate_deepcache(self, coordinator: DeepCacheCoordinator | None) -> None:
        """Let ``coordinator`` (or none) follow the next generation; the one before is unwrapped."""
        current = self._active_deepcache
        if current is not None and current is not coordinator:
            current.unwrap()
            self.state.remove_listener(current)
            self._active_deepcache = None
        if coordinator is not None and coordinator is not current:
            self.state.add_listener(coordinator)
            self._active_deepcache = coordinator

    def _set_fast_blocks(self, fused: bool) -> None:
        if fused and not self._fast_blocks:
            for denoiser in self.parts.denoisers:
                for block in denoiser.module.modules():
                    cross_cache = attached(block.attn2, AttentionCacheHook.name) if supports_fast_path(block) else None
                    if cross_cache is not None:
                        self._attach(block, BlockFastPathHook(self.state, cross_cache))
                        self._fast_blocks.append(block)
        elif not fused:
            while self._fast_blocks:
                block = self._fast_blocks[-1]
                detach(block, BlockFastPathHook.name)
                self._hooks = [(m, h) for m, h in self._hooks if m is not block or h.name != BlockFastPathHook.name]
                self._fast_blocks.pop()

    # -- calls -----------------------------------------------------------------------------

    def _opening(self) -> Opening | None:
        configuration = self.configuration
        if self._one_call is not None:
            config, deepcache = self._one_call, configuration.tgate_call[1]
        elif configuration.gates_plain_calls:
            config, deepcache = configuration.config, configuration.deepcache
        else:
            return None
        # DeepCache's wrappers an interrupted unwrap left behind go before the chains are checked
        for coordinator in {self._active_deepcache, *configuration.coordinators()} - {None}:
            coordinator.unwrap()
        if self._component_ids() != self._components:
            self._reinstall()  # a component was swapped: its hooks are built anew
        else:
            guards.keep_attached(self.parts, self._hooks, compiled=configuration.config.compile is not None)
        self._activate_deepcache(deepcache)
        return config, says_guided(self.pipe)

    def _component_ids(self) -> dict[str, int]:
        return {name: id(module) for name, module in components(self.pipe).items()}

    def _reinstall(self, configuration: Configuration | None = None) -> None:
        """Build every hook again (for ``configuration``, or the current one on swapped
        components). If that fails, the previous hooks come back where the components are the
        same; otherwise T-GATE is taken off the pipeline, so that it is never half attached."""
        configuration = configuration or self.configuration
        previous = (self.parts, self._pag, self.configuration, self._components)
        latent_batch = self.state.guidance.latent_batch  # learned by this call, before its loop opened
        self.uninstall()
        try:
            self._install_as(pipeline_parts(self.pipe), configuration)
        except BaseException:
            parts, pag, old_configuration, components = previous
            try:
                if self._component_ids() != components:
                    raise RuntimeError("components swapped")
                self._pag = pag
                self._install_as(parts, old_configuration)
            except BaseException:
                self.uninstall()
                self.pipe.__dict__.pop(_CONTROLLER_ATTR, None)
            raise
        self.state.guidance.latent_batch = latent_batch

    def _install_as(self, parts, configuration: Configuration) -> None:
        self.parts = parts
        self._pag = PagAfterGate([d.module for d in parts.denoisers]) if self._pag is not None else None
        self.configuration = configuration
        self.install()
        self.apply(configuration)

    @contextlib.contextmanager
    def config_for_one_call(self, config: TgateConfig) -> Iterator[None]:
        previous = self._one_call
        self._one_call = config
        try:
            yield
        finally:
            self._one_call = previous
            self.state.end()

    # -- what tests and benchmarks may read ----------------------------------------------------

    @property
    def hooks(self) -> list[tuple[torch.nn.Module, TgateHook]]:
        return list(self._hooks)

    @property
    def fast_blocks(self) -> list[torch.nn.Module]:
        return list(self._fast_blocks)


def controller_of(pipe) -> TgateController | None:
    return getattr(pipe, "__dict__", {}).get(_CONTROLLER_ATTR)


def configure(pipe, configuration: Configuration, tgate_call: Callable) -> TgateController:
    """Give ``pipe`` this configuration, installing T-GATE first if needed (with ``tgate_call`` as
    ``pipe.tgate``). Everything in ``configuration`` was validated before, so nothing is modified
    on bad input."""
    controller = controller_of(pipe)
    if controller is None:
        controller = TgateController(pipe, configuration, tgate_call)
        controller.install()
        pipe.__dict__[_CONTROLLER_ATTR] = controller
    else:
        controller.state.check_idle("change T-GATE's settings of")
    controller.apply(configuration)
    return controller


def remove(pipe) -> None:
    """Take T-GATE off ``pipe``; safe to run again if it was interrupted."""
    controller = controller_of(pipe)
    if controller is not None:
        controller.state.check_idle("disable T-GATE on")
        controller.uninstall()
        pipe.__dict__.pop(_CONTROLLER_ATTR, None)
