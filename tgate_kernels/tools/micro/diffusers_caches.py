"""diffusers' own caches on the micro transformers: what a user would pick instead of T-GATE.

Each is applied to a freshly loaded micro pipeline with diffusers' ``apply_*`` function, as
``enable_cache`` would (the micro PixArt and SD3 transformers lack ``CacheMixin``, and their
pipelines open no ``cache_context``: a pre-hook on the denoiser opens one per call, as pipelines
with ``CacheMixin`` denoisers do). Which apply, and why the others do not:

- **FirstBlockCache** (``threshold``): the whole stack but its first block is skipped when the
  first block's residual changed less than ``threshold`` since the last computed step (not on
  SD3's MMDiT, whose last block returns no text output, which diffusers 0.42.1's hook subtracts);
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
    refuses: Callable[[Any], str | None] = lambda pipe: None
    """Why the cache does not run on a pipeline (``None``: it does)."""


def _first_block_cache_refuses(pipe) -> str | None:
    blocks = getattr(pipe.transformer, "transformer_blocks", ())
    if blocks and getattr(blocks[-1], "context_pre_only", False):
        # diffusers 0.42.1's FirstBlockCache subtracts the last block's text output, which an
        # MMDiT's last block (SD3's) does not return
        return "FirstBlockCache fails on a last block that returns no text output (SD3's `context_pre_only`)"
    return None


def _no_cross_attention(pipe) -> str | None:
    if any(getattr(module, "is_cross_attention", False) for module in pipe.transformer.modules()):
        return None
    return "no cross-attention to skip: the same as the setting without it"


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
    DiffusersCache("FirstBlockCache 0.05", _first_block_cache(0.05), _first_block_cache_refuses),
    DiffusersCache("FirstBlockCache 0.1", _first_block_cache(0.1), _first_block_cache_refuses),
    DiffusersCache("FirstBlockCache 0.2", _first_block_cache(0.2), _first_block_cache_refuses),
    DiffusersCache("PAB, attention every 2nd step", _pyramid_attention_broadcast(2, None)),
    DiffusersCache("PAB, attention 2nd, cross-attention 4th", _pyramid_attention_broadcast(2, 4), _no_cross_attention),
)


def applies_to(pipe) -> bool:
    """Whether diffusers' block caches apply to ``pipe``'s denoiser (a transformer)."""
    return getattr(pipe, "transformer", None) is not None
