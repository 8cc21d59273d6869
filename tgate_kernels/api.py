"""The public switch: ``enable(pipe)``, ``disable(pipe)``, ``enabled(pipe)`` and ``pipe.tgate(...)``.

One :class:`TgateController` per pipeline owns every hook T-GATE attached to it. Enabling an
already enabled pipeline replaces its settings; it never stacks a second set of hooks.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

from .adapters import PipelineParts, pipeline_parts, pipeline_uses_cfg
from .deepcache import DeepCacheCoordinator
from .hooks import attention_cache, block_fast_path, cfg_batch
from .hooks.attention_cache import AttentionCacheHook
from .hooks.block_fast_path import BlockFastPathHook, supports_fast_path
from .hooks.cfg_batch import CfgBatchHook
from .hooks.generation import GenerationTracker
from .hooks.registry import attach, attached, detach
from .schedule import TgateSettings
from .state import GenerationState

_CONTROLLER_ATTR = "_tgate_controller"

KERNEL_MODES = ("auto", "off")


def _check_kernels(kernels) -> None:
    if kernels not in KERNEL_MODES:
        raise ValueError(
            f"`kernels` must be one of {KERNEL_MODES} ('auto': fused post-gate blocks with the best kernel "
            f"available; 'off': plain PyTorch), got {kernels!r}."
        )


class TgateController:
    """Everything T-GATE added to one pipeline, and the settings it runs with."""

    def __init__(self, pipe, parts: PipelineParts, settings: TgateSettings) -> None:
        self.pipe = pipe
        self.parts = parts
        self.settings = settings
        self.num_inference_steps: int | None = None
        self.gates_plain_calls = False
        self.state = GenerationState(parts.cfg_half)
        self._call_settings: TgateSettings | None = None
        self.deepcache: DeepCacheCoordinator | None = None
        self._attention_modules: list = []
        self._fast_blocks: list = []
        self._tracker = GenerationTracker(pipe, self.state, self._settings_for_call, pipeline_uses_cfg)
        self._previous_tgate = pipe.__dict__.get("tgate")

    def _settings_for_call(self) -> TgateSettings | None:
        if self._call_settings is not None:
            return self._call_settings
        return self.settings if self.gates_plain_calls else None

    def install(self) -> None:
        for denoiser in self.parts.denoisers:
            if attached(denoiser, cfg_batch.HOOK_NAME) is not None:
                raise ValueError(
                    f"`pipe` shares its {type(denoiser).__name__} with another pipeline T-GATE is enabled on "
                    f"(pipelines made with `from_pipe` or from another's components do); disable that one first."
                )
        try:
            for denoiser in self.parts.denoisers:
                attach(denoiser, CfgBatchHook(self.state, primary=denoiser is self.parts.denoiser), cfg_batch.HOOK_NAME)
            self._attention_modules = self.parts.attention_modules()
            for module in self._attention_modules:
                attach(module, AttentionCacheHook(self.state), attention_cache.HOOK_NAME)
            self._tracker.install()
            self.pipe.tgate = types.MethodType(tgate, self.pipe)
            self.set_kernels("auto")
        except BaseException:
            self.uninstall()
            raise

    @property
    def kernels(self) -> str:
        return "auto" if self.state.fused_blocks else "off"

    def set_kernels(self, kernels: str) -> None:
        """'auto' runs the fused post-gate block fast path; 'off' leaves the blocks to PyTorch."""
        fused = kernels == "auto"
        if fused and not self._fast_blocks:
            self._fast_blocks = [
                block for denoiser in self.parts.denoisers for block in denoiser.modules() if supports_fast_path(block)
            ]
            for block in self._fast_blocks:
                cross_cache = attached(block.attn2, attention_cache.HOOK_NAME)
                attach(block, BlockFastPathHook(self.state, cross_cache), block_fast_path.HOOK_NAME)
        elif not fused:
            for block in self._fast_blocks:
                detach(block, block_fast_path.HOOK_NAME)
            self._fast_blocks = []
        self.state.fused_blocks = fused

    def set_deepcache(self, coordinator: DeepCacheCoordinator | None) -> None:
        if self.deepcache is not None:
            self.state.step_listeners.remove(self.deepcache)
        self.deepcache = coordinator
        if coordinator is not None:
            self.state.step_listeners.append(coordinator)

    def uninstall(self) -> None:
        """Remove everything ``install`` attached; safe on a partial install."""
        self._tracker.uninstall()
        self.set_deepcache(None)
        self.set_kernels("off")
        for module in self._attention_modules:
            detach(module, attention_cache.HOOK_NAME)
        for denoiser in self.parts.denoisers:
            detach(denoiser, cfg_batch.HOOK_NAME)
        self._attention_modules = []
        if self._previous_tgate is None:
            self.pipe.__dict__.pop("tgate", None)
        else:
            self.pipe.tgate = self._previous_tgate

    @contextlib.contextmanager
    def settings_for_one_call(self, settings: TgateSettings) -> Iterator[None]:
        previous = self._call_settings
        self._call_settings = settings
        try:
            yield
        finally:
            self._call_settings = previous
            self.state.end()


def controller_of(pipe) -> TgateController | None:
    return getattr(pipe, "__dict__", {}).get(_CONTROLLER_ATTR)


def is_enabled(pipe) -> bool:
    """Whether the ordinary ``pipe(...)`` call runs with T-GATE."""
    controller = controller_of(pipe)
    return controller is not None and controller.gates_plain_calls


def attach_controller(pipe, settings: TgateSettings) -> TgateController:
    """The pipeline's controller, installing the hooks first if it has none. Validates the
    pipeline before anything is modified."""
    controller = controller_of(pipe)
    if controller is not None:
        return controller
    controller = TgateController(pipe, pipeline_parts(pipe), settings)
    controller.install()
    pipe.__dict__[_CONTROLLER_ATTR] = controller
    return controller


def enable(
    pipe,
    gate_step: int | float = 10,
    sp_interval: int = 5,
    fi_interval: int = 1,
    warm_up: int = 2,
    lcm: bool | None = None,
    deepcache: dict | bool | None = None,
    kernels: str = "auto",
):
    """Make the ordinary ``pipe(...)`` call run with T-GATE; returns ``pipe``.

    Args:
        gate_step: the step from which cross-attention is reused and classifier-free guidance
            is dropped: an int step index in ``[0, num_inference_steps]`` or a float fraction in
            (0, 1) of the steps the call runs (img2img's ``strength`` included).
        sp_interval: self-attention caching interval before the gate (>= 1).
        fi_interval: self-attention caching interval after the gate (>= 1; 1 computes it every step).
        warm_up: steps before self-attention is first cached (>= 0).
        lcm: ``True`` for a pipeline without a CFG batch (LCM); ``None`` detects it. The detection
            decides either way, so two different samples are never averaged.
        deepcache: ``{"cache_interval": 3, "cache_branch_id": 0}`` runs DeepCache (its own
            ``DeepCacheSDHelper``) together with T-GATE on UNet pipelines; ``False`` removes it;
            ``None`` leaves it as it is.
        kernels: ``"auto"`` runs known transformer blocks after the gate as ``attn1`` → one fused
            op (``torch.ops.tgate.post_gate_residual_norm``) → feed-forward, skipping ``norm2`` and
            ``attn2``; ``"off"`` leaves every block to plain PyTorch (bit-exact with the reference).

    Calling ``enable`` on an enabled pipeline replaces its settings.
    """
    settings = TgateSettings(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)
    _check_kernels(kernels)
    controller = configure(pipe, settings, deepcache)
    controller.gates_plain_calls = True
    controller.set_kernels(kernels)
    return pipe


def configure(pipe, settings: TgateSettings, deepcache: dict | bool | None = None) -> TgateController:
    """Give ``pipe`` these settings and DeepCache option (``None`` leaves DeepCache as it is),
    attaching T-GATE first if needed; everything is validated before anything is modified."""
    coordinator = deepcache_option(pipe, deepcache)
    controller = attach_controller(pipe, settings)
    controller.settings = settings
    if deepcache is not None:
        controller.set_deepcache(coordinator)
    return controller


def deepcache_option(pipe, option) -> DeepCacheCoordinator | None:
    """The DeepCache coordinator an ``enable``/loader option asks for, validated."""
    if option is None or option is False:
        return None
    return DeepCacheCoordinator.from_option(pipe, option)


def disable(pipe):
    """Remove every hook T-GATE attached to ``pipe``; returns ``pipe``. A no-op on a pipeline
    that is not enabled."""
    controller = pipe.__dict__.pop(_CONTROLLER_ATTR, None)
    if controller is not None:
        controller.uninstall()
    return pipe


@contextlib.contextmanager
def enabled(pipe, **settings) -> Iterator:
    """``with tgate_kernels.enabled(pipe, gate_step=10): pipe(...)``; on exit the pipeline is as
    it was before (disabled, or enabled with its previous settings)."""
    controller = controller_of(pipe)
    previous = (
        (controller.settings, controller.gates_plain_calls, controller.deepcache, controller.kernels) if controller else None
    )
    enable(pipe, **settings)
    try:
        yield pipe
    finally:
        if previous is None:
            disable(pipe)
        elif controller_of(pipe) is controller:  # unless the body disabled it itself
            controller.settings, controller.gates_plain_calls, deepcache, kernels = previous
            controller.set_deepcache(deepcache)
            controller.set_kernels(kernels)


def tgate(
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
    settings = controller.settings.updated(
        gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm
    )
    steps = num_inference_steps if num_inference_steps is not None else controller.num_inference_steps
    if steps is not None:
        settings.resolve_gate_step(steps)
        kwargs["num_inference_steps"] = steps
    with controller.settings_for_one_call(settings):
        return self(*args, **kwargs)
