"""DeepCache beside T-GATE, through DeepCache's own ``DeepCacheSDHelper``.

The helper (DeepCache 0.1.1) wraps the UNet's blocks with closures that reuse deep features on
all but every ``cache_interval``-th step. It is wrapped around the UNet only while a
generation's denoising loop runs, so between calls (and after an exception) the pipeline carries
no DeepCache state at all, and ``disable()`` has nothing of it left to undo.

The helper wraps by assigning instance ``forward`` attributes one module at a time, so a wrap or
unwrap that stops halfway (an error, Ctrl-C) would leave some modules wrapped. Every wrap is
therefore preceded by a snapshot of the UNet's instance forwards, and every unwrap is the
restoration of that snapshot: idempotent, and run again by the next generation or ``disable()``
if it was interrupted.

At the gate it does what the reference does: the helper's features are reset at steps
``gate_step - 1`` and ``gate_step``, so every cross-attention runs at the step that caches it,
and DeepCache rebuilds its features at the halved batch that follows.
"""

from __future__ import annotations

from ..config import DeepCacheOptions
from .snapshot import InstanceAttributes
from .generation import GenerationState, StepListener


class DeepCacheCoordinator(StepListener):
    """Runs a ``DeepCacheSDHelper`` on ``pipe`` during each T-GATE generation."""

    def __init__(self, pipe, options: DeepCacheOptions) -> None:
        unet = getattr(pipe, "unet", None)
        if not all(getattr(unet, part, None) is not None for part in ("down_blocks", "mid_block", "up_blocks")):
            raise ValueError(
                f"`deepcache` needs a pipeline with a UNet that has down, mid and up blocks (Stable Diffusion, SDXL "
                f"and their img2img, inpaint and ControlNet variants); {type(pipe).__name__} has "
                f"{'a UNet without a mid block' if unet is not None else 'none'}."
            )
        if options.cache_branch_id >= 3 * len(unet.down_blocks):
            raise ValueError(
                f"`deepcache['cache_branch_id']` must be below {3 * len(unet.down_blocks)} for this UNet "
                f"({len(unet.down_blocks)} down blocks), got {options.cache_branch_id!r}."
            )
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError as error:
            raise ImportError("`deepcache` needs the DeepCache package: pip install DeepCache==0.1.1") from error
        self.pipe = pipe
        self.options = options
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=options.cache_interval, cache_branch_id=options.cache_branch_id)
        self._unwrapped: InstanceAttributes | None = None

    @property
    def wrapped(self) -> bool:
        return self._unwrapped is not None

    def wrap(self) -> None:
        """Wrap the helper around the UNet, all or nothing."""
        self.unwrap()
        self._unwrapped = InstanceAttributes(self.pipe.unet.modules(), "forward")
        try:
            self.helper.enable()
        except BaseException:
            self.unwrap()
            raise

    def unwrap(self) -> None:
        """Put every UNet module's forward back as it was before the wrap; idempotent."""
        if self._unwrapped is not None:
            self._unwrapped.restore()
            self._unwrapped = None
            self.helper.reset_states()

    def generation_started(self, state: GenerationState) -> None:
        self.wrap()

    def step_started(self, state: GenerationState) -> None:
        if state.step in (state.gate_step - 1, state.gate_step) and state.step > 0:
            self.wrap()

    def generation_ended(self, state: GenerationState) -> None:
        self.unwrap()
