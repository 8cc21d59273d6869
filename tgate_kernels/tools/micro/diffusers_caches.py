"""diffusers' own caches on the micro transformers: what a user would pick instead of T-GATE.

Each is applied to a freshly loaded micro pipeline with diffusers' ``apply_*`` function, as
``enable_cache`` would (the micro PixArt and SD3 transformers lack ``CacheMixin``, and their
pipelines open no ``cache_context``: a pre-hook on the denoiser opens one per call, as pipelines
with ``CacheMixin`` denoisers do; FLUX's pipeline opens its own, one for the prompt's calls and
one for the negative prompt's). Which apply, and why the others do not:

- **FirstBlockCache** (``threshold``): the whole stack but its first block is skipped when the
  first block's residual changed less than ``threshold`` since the last computed step (not on
  SD3's MMDiT, whose last block returns no text output, which diffusers 0.42.1's hook subtracts);
- **Pyramid Attention Broadcast**: attention outputs reused for ``skip_range - 1`` of every
  ``skip_range`` steps between timesteps 100 and 800 (self-/joint attention, and cross-attention
  in the second setting); not with true CFG (FLUX's two calls a step), since it counts calls;
- **TaylorSeer** (``cache_interval``): every attention output of the blocks computed every
  ``cache_interval``-th step after the first three and predicted in between from its last value
  and first difference (a first-order Taylor step), on FLUX, whose pipeline gives each guidance
  part its own context; on the batched pipelines one context would hold both parts' outputs;
- MagCache needs magnitude ratios calibrated per model; FasterCache needs the unconditional
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
    refuses: Callable[[Any, str | None], str | None] = lambda pipe, guidance: None
    """Why the cache does not run on a pipeline guided as ``guidance`` says (``"batched"``,
    ``"separate"`` calls or ``None``; see :func:`.quality.guidance_of`), or ``None``: it does."""


def _first_block_cache_refuses(pipe, guidance: str | None) -> str | None:
    blocks = getattr(pipe.transformer, "transformer_blocks", ())
    if blocks and getattr(blocks[-1], "context_pre_only", False):
        # diffusers 0.42.1's FirstBlockCache subtracts the last block's text output, which an
        # MMDiT's last block (SD3's) does not return
        return "FirstBlockCache fails on a last block that returns no text output (SD3's `context_pre_only`)"
    return None


def _pab_refuses(pipe, guidance: str | None) -> str | None:
    if guidance == "separate":
        # its state (a call counter and the last output) is per attention module, not per context
        return "PAB counts calls, not steps: the negative prompt's call would reuse the prompt call's attention"
    return None


def _pab_with_cross_attention_refuses(pipe, guidance: str | None) -> str | None:
    if not any(getattr(module, "is_cross_attention", False) for module in pipe.transformer.modules()):
        return "no cross-attention to skip: the same as the setting without it"
    return _pab_refuses(pipe, guidance)


def _open_cache_context_per_call(transformer) -> None:
    from diffusers.models.cache_utils import CacheMixin

    if not isinstance(transformer, CacheMixin):  # its pipeline opens none
        transformer.register_forward_pre_hook(lambda module, args: _compat.open_cache_context(module, "denoiser"))


def _first_block_cache(threshold: float) -> Callable[[Any], None]:
    def apply(pipe) -> None:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
        _open_cache_context_per_call(pipe.transformer)

    return apply


def _taylorseer_refuses(pipe, guidance: str | None) -> str | None:
    if guidance == "batched":
        return "TaylorSeer extrapolates per cache context, and this pipeline guides both parts in one call (one context)"
    return None


def _taylorseer(cache_interval: int) -> Callable[[Any], None]:
    def apply(pipe) -> None:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        config = TaylorSeerCacheConfig(cache_interval=cache_interval, taylor_factors_dtype=torch.float32)
        apply_taylorseer_cache(pipe.transformer, config)

    return apply


def _pyramid_attention_broadcast(spatial: int, cross: int | None) -> Callable[[Any], None]:
    def apply(pipe) -> None:
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        transformer = pipe.transformer
        now: dict[str, float] = {}

        def note_timestep(module, args, kwargs) -> None:
            # FLUX's transformer takes the timestep as a fraction of 1000; its pipeline keeps the
            # scheduler's own, on the scale of PAB's skip range
            timestep = getattr(pipe, "_current_timestep", None)
            if timestep is None:
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
    DiffusersCache("PAB, attention every 2nd step", _pyramid_attention_broadcast(2, None), _pab_refuses),
    DiffusersCache("PAB, attention 2nd, cross-attention 4th", _pyramid_attention_broadcast(2, 4), _pab_with_cross_attention_refuses),
    DiffusersCache("TaylorSeer, every 2nd step", _taylorseer(2), _taylorseer_refuses),
    DiffusersCache("TaylorSeer, every 4th step", _taylorseer(4), _taylorseer_refuses),
)


def applies_to(pipe) -> bool:
    """Whether diffusers' block caches apply to ``pipe``'s denoiser (a transformer)."""
    return getattr(pipe, "transformer", None) is not None
