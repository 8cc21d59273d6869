"""What a client asks a step batcher for, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate, as ``pipe(prompt, negative_prompt=..., ...)`` would for one prompt.

    ``gate_step`` is T-GATE's gate for this request alone (an int, or a fraction of the steps);
    ``None`` runs it without T-GATE. ``seed`` seeds a CPU generator, as
    ``generator=torch.Generator().manual_seed(seed)`` does. ``callback_on_step_end`` is called
    as ``callback(step, timestep, latents)`` after each step; an exception it raises fails this
    request alone.
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    gate_step: int | float | None = None
    output_type: str = "pil"
    callback_on_step_end: Callable[[int, Any, Any], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"`prompt` must be a non-empty string, got {self.prompt!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"`negative_prompt` must be a string or None, got {self.negative_prompt!r}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {steps!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {self.guidance_scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer, got {self.seed!r}")
        gate = self.gate_step
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float)) or gate < 0):
            raise ValueError(
                f"`gate_step` must be None (no T-GATE), a step number >= 0 or a fraction of the steps in (0, 1), got {gate!r}"
            )
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
