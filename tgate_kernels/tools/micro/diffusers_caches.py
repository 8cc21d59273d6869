"""diffusers' own caches on the micro transformers: what a user would pick instead of T-GATE.

Each is applied to a freshly loaded micro pipeline with diffusers' ``apply_*`` function, as
``enable_cache`` would (the micro PixArt and SD3 transformers lack ``CacheMixin``, and their
pipelines open no ``cache_context``: a pre-hook on the denoiser opens one per call, as pipelines
with ``CacheMixin`` denoisers do). Which apply, and why the others do not:

- **FirstBlockCache** (``threshold``): the whole stack but its first block is skipped when the
  first block's residual changed less than ``threshold`` since the last computed step;
- **Pyramid Attention Broadcast**: attention outputs reused for ``skip_range - 1`` of every
  ``skip_range`` steps between timesteps 100 and 800 (self-/joint attention, and cross-attention
  in the second setting);
- TaylorSeer is left out: its default module patterns match FLUX-like names, not these blocks;
  MagCache needs magnitude ratios calibrated per model; FasterCache needs the unconditional
  branch split from the batch by a pipeline that tells it which it is. The UNet (micro SD) has
  no block registered for any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ... import _compat


@dataclass(frozen=True)
class DiffusersCache:
    variant: str
    """The row's name in the quality table."""
    apply: Callable[[Any], None]
    """Applies the cache to a pipeline's transformer."""


def _first_block_cache(threshold: float) -> Callable[[Any], None]:
    def apply(pipe) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        transformer = pipe.transformer
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=threshold))
        transformer.register_forward_pre_hook(lambda module, args: _compat.open_cache_context(module, "denoiser"))

    return apply


def _pyramid_attention_broadcast(spatial: int, cross: int | None) -> Callable[[Any], None]:
    def apply(pipe) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        transformer = pipe.transformer
        now: dict[str, float] = {}

        def note_timestep(module, args, kwargs) -> None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            now["timestep"] = float(torch.as_tensor(timestep).flatten()[0])

        transformer.register_forward_pre_hook(note_timestep, with_kwargs=True)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=spatial,
            cross_attention_block_skip_range=cross,
            spatial_attention_timestep_skip_range=(100, 800),
            cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: now["timestep"],
        )
        apply_pyramid_attention_broadcast(transformer, config)

    return apply


DIFFUSERS_CACHES: tuple[DiffusersCache, ...] = (
    DiffusersCache("FirstBlockCache 0.05", _first_block_cache(0.05)),
    DiffusersCache("FirstBlockCache 0.1", _first_block_cache(0.1)),
    DiffusersCache("FirstBlockCache 0.2", _first_block_cache(0.2)),
    DiffusersCache("PAB, attention every 2nd step", _pyramid_attention_broadcast(2, None)),
    DiffusersCache("PAB, attention 2nd, cross-attention 4th", _pyramid_attention_broadcast(2, 4)),
)


def applies_to(pipe) -> bool:
    """Whether diffusers' block caches apply to ``pipe``'s denoiser (a transformer)."""
    return getattr(pipe, "transformer", None) is not None
