"""Everything T-GATE attached to one pipeline, and the settings it runs with.

One :class:`TgateController` per pipeline, kept in the pipeline's ``__dict__``. It installs the
hooks (each a no-op outside a generation), keeps them attached when others rewire the pipeline
(offloading re-applied after every call, a component swapped, a hook removed from under ours),
and takes every one of them out again. Installing is all or nothing; uninstalling is idempotent,
so an interrupted ``disable()`` completes when it runs again.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from .. import _compat
from ..families import registry as adapters
from .compilation import CompileSettings
from .deepcache import DeepCacheCoordinator
from .guidance import KeptPart
from .guided_arguments import GuidedArguments
from ..hooks.attention_cache import AttentionCacheHook
from ..hooks.base import COPY_REFUSAL, PICKLE_REFUSAL, TgateHook
from ..hooks.block_fast_path import BlockFastPathHook, supports_fast_path
from ..hooks.denoiser import DenoiserHook
from ..hooks.pipeline_loop import GenerationTracker, Opening
from ..hooks.registry import attach, attached, detach, ensure_in_chain, foreign_caches
from ..config import KernelMode
from .pag import PagAfterGate
from ..schedule import AUTO, TgateSettings
from .snapshot import InstanceAttributes
from .generation import GenerationState

_CONTROLLER_ATTR = "_tgate_controller"


@dataclass(frozen=True)
class Configuration:
    """What a pipeline runs with: the schedule of its plain calls and of ``pipe.tgate``, the options,
    and whether plain calls are gated.

    ``enable`` sets what plain ``pipe(...)`` calls run with (``settings``, ``deepcache``); a loader
    sets the defaults of ``pipe.tgate`` (``loader_settings``, ``loader_deepcache``,
    ``default_steps``) and leaves plain calls as they were. Without a loader, ``pipe.tgate`` runs
    with ``enable``'s settings."""

    settings: TgateSettings
    kernels: KernelMode = KernelMode.AUTO
    kept: KeptPart = KeptPart.AUTO
    deepcache: DeepCacheCoordinator | None = None
    compile: CompileSettings | None = None
    gates_plain_calls: bool = False
    loader_settings: TgateSettings | None = None
    """The defaults of ``pipe.tgate`` a loader was given (``None``: no loader ran)."""
    loader_deepcache: DeepCacheCoordinator | None = None
    default_steps: int | None = None
    """``num_inference_steps`` a loader was given: the default of ``pipe.tgate``."""

    def __post_init__(self) -> None:
        # checked here, so that enable and the loaders refuse the same combinations
        deepcache = self.deepcache is not None or self.loader_deepcache is not None
        if deepcache and self.compile is not None:
            raise ValueError(
                "`compile` does not combine with `deepcache`: DeepCache's wrappers decide per step inside the compiled "
                "region. Use one of them."
            )
        auto = self.settings.auto or (self.loader_settings is not None and self.loader_settings.auto)
        if auto and (deepcache or self.compile is not None):
            raise ValueError(
                "`gate_step='auto'` does not combine with `deepcache` or `compile`: it watches every cross-attention "
                "output until the gate, which DeepCache skips and a compiled graph does not show. Use a fixed gate_step."
            )

    @property
    def tgate_call(self) -> tuple[TgateSettings, DeepCacheCoordinator | None]:
        """What ``pipe.tgate`` runs with when its call gives no setting."""
        if self.loader_settings is not None:
            return self.loader_settings, self.loader_deepcache
        return self.settings, self.deepcache

    def coordinators(self) -> tuple[DeepCacheCoordinator, ...]:
        return tuple(c for c in (self.deepcache, self.loader_deepcache) if c is not None)


class TgateController:
    """Everything T-GATE attached to one pipeline: its hooks, its configuration and the state of
    the generation running; installs, reconfigures and removes them as one."""

    def __init__(self, pipe, configuration: Configuration) -> None:
        self.parts = adapters.pipeline_parts(pipe)
        adapters.check_pipeline(pipe, runs=True)
        self.pipe = pipe
        self.configuration = configuration
        self.state = GenerationState(adapters.guidance_tracker(pipe, self.parts, configuration.kept))
        self._call_settings: TgateSettings | None = None
        self._active_deepcache: DeepCacheCoordinator | None = None
        """The DeepCache coordinator following the generation that runs (or ran last)."""
        self._tracker = GenerationTracker(pipe, self.state, self._opening)
        self._hooks: list[tuple[torch.nn.Module, TgateHook]] = []
        self._fast_blocks: list[torch.nn.Module] = []
        self._components: dict[str, int] = {}
        self._pipe_tgate: InstanceAttributes | None = None
        self._pag = PagAfterGate([d.module for d in self.parts.denoisers]) if hasattr(type(pipe), "do_perturbed_attention_guidance") else None

    # -- installing ------------------------------------------------------------------------

    def install(self) -> None:
        """Attach every hook; on any failure (or interrupt) nothing stays attached."""
        self._refuse_foreign_caches(ValueError)
        for denoiser in self.parts.denoisers:
            if attached(denoiser.module, DenoiserHook.name) is not None:
                raise ValueError(
                    f"`pipe` shares its {type(denoiser.module).__name__} (`{denoiser.attribute}`) with another "
                    f"pipeline T-GATE is enabled on (pipelines made with `from_pipe` or from another's components "
                    f"do); disable that one first."
                )
        try:
            plan_as_data = self.configuration.compile is not None
            interleaved = adapters.interleaved_arguments(self.pipe)
            for denoiser in self.parts.denoisers:
                arguments = GuidedArguments(denoiser.module, interleaved)
                hook = DenoiserHook(self.state, denoiser.attribute, denoiser.main, arguments)
                self._attach(denoiser.module, hook)
                self.state.add_stateful_hook(hook)
                for attention in denoiser.attentions:
                    cache = AttentionCacheHook(self.state, denoiser.attribute, attention.cross, plan_as_data, attention.name)
                    self._attach(attention.module, cache)
                    self.state.add_stateful_hook(cache)
            if self._pag is not None:
                self.state.add_listener(self._pag)
            self._tracker.install()
            self._pipe_tgate = InstanceAttributes([self.pipe], "tgate")
            self.pipe.tgate = types.MethodType(_tgate_call, self.pipe)
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
        if (configuration.compile is None) != (self.configuration.compile is None) and self._hooks:
            # compiled or not decides how every hook is built: build them again
            self._reinstall(configuration)
            return
        self._activate_deepcache(None)
        # under torch.compile inductor fuses the plain residual additions and LayerNorm itself,
        # which measured faster than calling the opaque fused op (bench/RESULTS.md)
        self._set_fast_blocks(configuration.kernels is KernelMode.AUTO and configuration.compile is None)
        self.state.guidance.kept_option = configuration.kept
        for module, hook in self._hooks:
            if isinstance(hook, DenoiserHook):
                hook.compile(configuration.compile)
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
        if self._call_settings is not None:
            settings, deepcache = self._call_settings, configuration.tgate_call[1]
        elif configuration.gates_plain_calls:
            settings, deepcache = configuration.settings, configuration.deepcache
        else:
            return None
        # DeepCache's wrappers an interrupted unwrap left behind go before the chains are checked
        for coordinator in {self._active_deepcache, *configuration.coordinators()} - {None}:
            coordinator.unwrap()
        self.keep_attached()
        self._activate_deepcache(deepcache)
        return settings, adapters.says_guided(self.pipe)

    def keep_attached(self) -> None:
        """Before a generation: follow a swapped component, and put back any hook someone took
        out of its module's forward chain; refuse a cache of another library added since."""
        if self._component_ids() != self._components:
            self._reinstall()
            return
        self._refuse_foreign_caches(RuntimeError)
        if self.configuration.compile is not None:
            offloaded = [d.attribute for d in self.parts.denoisers if _compat.has_accelerate_hook(d.module)]
            if offloaded:
                raise RuntimeError(
                    f"T-GATE's compile=... does not combine with accelerate's offloading of {offloaded} (its hooks move "
                    f"weights inside the compiled region): enable T-GATE with compile=False, or do not offload."
                )
        for module, hook in self._hooks:
            ensure_in_chain(module, hook)

    def _refuse_foreign_caches(self, error: type[Exception]) -> None:
        found = [f"`{d.attribute}` {entry}" for d in self.parts.denoisers for entry in foreign_caches(d.module)]
        if found:
            raise error(
                f"T-GATE does not compose with other caches of attention or block outputs: {'; '.join(found[:3])}"
                f"{' ...' if len(found) > 3 else ''}. Both would reuse outputs across steps, at batch sizes T-GATE "
                f"changes. Remove that cache first (e.g. `pipe.transformer.disable_cache()`) or disable T-GATE."
            )

    def _component_ids(self) -> dict[str, int]:
        return {name: id(module) for name, module in adapters.components(self.pipe).items()}

    def _reinstall(self, configuration: Configuration | None = None) -> None:
        """Build every hook again (for ``configuration``, or the current one on swapped
        components). If that fails, the previous hooks come back where the components are the
        same; otherwise T-GATE is taken off the pipeline, so that it is never half attached."""
        configuration = configuration or self.configuration
        previous = (self.parts, self._pag, self.configuration, self._components)
        latent_batch = self.state.guidance.latent_batch  # learned by this call, before its loop opened
        self.uninstall()
        try:
            self._install_as(adapters.pipeline_parts(self.pipe), configuration)
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
    def settings_for_one_call(self, settings: TgateSettings) -> Iterator[None]:
        previous = self._call_settings
        self._call_settings = settings
        try:
            yield
        finally:
            self._call_settings = previous
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


def configure(pipe, configuration: Configuration) -> TgateController:
    """Give ``pipe`` this configuration, installing T-GATE first if needed. Everything in
    ``configuration`` was validated before, so nothing is modified on bad input."""
    controller = controller_of(pipe)
    if controller is None:
        controller = TgateController(pipe, configuration)
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


def refuse_auto_in_tgate_api(gate_step) -> None:
    """The loaders and ``pipe.tgate`` keep the ``tgate`` package's API, whose gate is a step."""
    if gate_step == AUTO:
        raise ValueError(
            "`gate_step='auto'` is not available through the tgate loaders and `pipe.tgate` (the `tgate` package's "
            "API, whose gate is a step): use tgate_kernels.enable(pipe, gate_step='auto') and call the pipeline itself."
        )


def _tgate_call(
    self,
    *args,
    gate_step: int | float | None = None,
    num_inference_steps: int | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
    lcm: bool | None = None,
    **kwargs,
):
    """The pipeline's ordinary call with T-GATE settings: ``pipe.tgate(prompt, gate_step=10,
    num_inference_steps=25, **any pipeline argument)``. Settings not given here come from the
    loader (or ``enable``); settings given here win."""
    controller = controller_of(self)
    if controller is None:
        raise RuntimeError("`pipe.tgate` was called on a pipeline that T-GATE is no longer attached to.")
    controller.state.check_can_open()
    defaults, _ = controller.configuration.tgate_call
    refuse_auto_in_tgate_api(gate_step if gate_step is not None else defaults.gate_step)
    settings = defaults.updated(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)
    steps = num_inference_steps if num_inference_steps is not None else controller.configuration.default_steps
    if steps is not None:
        # as with the reference, a gate beyond the steps is never reached (the call says so)
        settings.resolve_gate_step(steps, beyond_allowed=True)
        kwargs["num_inference_steps"] = steps
    with controller.settings_for_one_call(settings):
        return self(*args, **kwargs)
