"""DeepCache beside T-GATE, through DeepCache's own ``DeepCacheSDHelper``.

The helper (DeepCache 0.1.1) wraps the UNet's blocks with closures that reuse deep features on
all but every ``cache_interval``-th step. It is wrapped around the UNet only while a
generation's denoising loop runs, so between calls (and after an exception) the pipeline carries
no DeepCache state at all, and ``disable()`` has nothing of it left to undo.

At the gate it does what the reference does: the helper's features are reset at steps
``gate_step - 1`` and ``gate_step``, so every cross-attention runs at the step that caches it,
and DeepCache rebuilds its features at the halved batch that follows.
"""

from __future__ import annotations

import numbers

from .state import GenerationState, StepListener


def _check(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`deepcache['{name}']` must be an int >= {minimum}, got {value!r}.")


class DeepCacheCoordinator(StepListener):
    """Runs a ``DeepCacheSDHelper`` on ``pipe`` during each T-GATE generation."""

    def __init__(self, pipe, cache_interval: int = 3, cache_branch_id: int = 0) -> None:
        _check("cache_interval", cache_interval, 1)
        _check("cache_branch_id", cache_branch_id, 0)
        unet = getattr(pipe, "unet", None)
        if not all(hasattr(unet, part) for part in ("down_blocks", "mid_block", "up_blocks")):
            raise ValueError(
                f"`deepcache` needs a pipeline with a UNet (Stable Diffusion, SDXL and their img2img, inpaint and "
                f"ControlNet variants); {type(pipe).__name__} has none."
            )
        if cache_branch_id >= 3 * len(unet.down_blocks):
            raise ValueError(
                f"`deepcache['cache_branch_id']` must be below {3 * len(unet.down_blocks)} for this UNet "
                f"({len(unet.down_blocks)} down blocks), got {cache_branch_id!r}."
            )
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as error:
            raise ImportError("`deepcache` needs the DeepCache package: pip install DeepCache==0.1.1") from error
        self.cache_interval = cache_interval
        self.cache_branch_id = cache_branch_id
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
        self._wrapped = False
        self._plain_modules: list = []

    @classmethod
    def from_option(cls, pipe, option) -> "DeepCacheCoordinator":
        if isinstance(option, DeepCacheCoordinator):
            return option
        if not isinstance(option, dict):
            raise TypeError(
                f"`deepcache` must be a dict like {{'cache_interval': 3, 'cache_branch_id': 0}}, False or None, "
                f"got {option!r}."
            )
        unknown = set(option) - {"cache_interval", "cache_branch_id"}
        if unknown:
            raise ValueError(
                f"`deepcache` got unknown keys {sorted(unknown)}; allowed: 'cache_interval', 'cache_branch_id'."
            )
        return cls(pipe, **option)

    def generation_started(self, state: GenerationState) -> None:
        unet = self.helper.pipe.unet
        self._plain_modules = [m for m in unet.modules() if "forward" not in m.__dict__]
        self.helper.enable()
        self._wrapped = True

    def step_started(self, state: GenerationState) -> None:
        if state.step in (state.gate_step - 1, state.gate_step) and state.step > 0:
            self.helper.disable()
            self.helper.enable()

    def generation_ended(self, state: GenerationState) -> None:
        if self._wrapped:
            self._wrapped = False
            self.helper.disable()
            # the helper unwraps by assigning the saved bound methods: drop them so every module
            # is back to its class's forward
            for module in self._plain_modules:
                forward = module.__dict__.get("forward")
                if getattr(forward, "__self__", None) is module and forward.__func__ is type(module).forward:
                    del module.__dict__["forward"]
            self._plain_modules = []
