"""The fast path of a diffusers ``BasicTransformerBlock`` after the gate.

After the gate a block's cross-attention output is a cached tensor, yet the block still computes
``norm2`` for a cross-attention that no longer runs, adds the cached output in a pass of its
own, and reads the result again for the feed-forward's norm. This hook runs instead
``attn1`` → one fused op (both residual additions and the feed-forward's LayerNorm, with
PixArt's modulation) → feed-forward, skipping ``norm2`` and ``attn2`` entirely.

It is attached only with ``kernels="auto"``, only to blocks of a shape it knows (SD/SDXL
``layer_norm`` blocks and PixArt ``ada_norm_single`` blocks, no GLIGEN, no positional embedding),
and it takes over only when the cross-attention cache is filled, in a dtype the fused op
supports; every other call goes to the block's own forward.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock

from .. import _compat, ops
from ..schedule import AttentionAction
from ..engine.generation import GenerationState
from .attention_cache import AttentionCacheHook
from .base import TgateHook

_FAST_NORM_TYPES = ("layer_norm", "ada_norm_single")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ARGUMENTS = ("attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
                    "cross_attention_kwargs", "class_labels", "added_cond_kwargs")
"""``BasicTransformerBlock.forward``'s arguments after ``hidden_states``, in order."""


def supports_fast_path(block: torch.nn.Module) -> bool:
    return (
        isinstance(block, BasicTransformerBlock)
        and block.norm_type in _FAST_NORM_TYPES
        and block.attn2 is not None
        and not block.only_cross_attention
        and not block.double_self_attention
        and block.pos_embed is None
        and not hasattr(block, "fuser")
        and isinstance(_feed_forward_norm(block), torch.nn.LayerNorm)
    )


def _feed_forward_norm(block) -> torch.nn.Module:
    return block.norm2 if block.norm_type == "ada_norm_single" else block.norm3


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _same_place(reference: torch.Tensor, *tensors) -> bool:
    """Whether every given tensor has ``reference``'s dtype and device. Under autocast, or with
    offloaded weights (accelerate, group offloading: on ``meta`` until their module's own
    forward loads them), they do not, and the block's own forward must run."""
    return all(t is None or (t.dtype == reference.dtype and t.device == reference.device) for t in tensors)


class BlockFastPathHook(TgateHook):
    """``cross_cache`` is the cache hook of the block's ``attn2``."""

    name = "tgate_block_fast_path"

    def __init__(self, state: GenerationState, cross_cache: AttentionCacheHook) -> None:
        super().__init__(state)
        self.cross_cache = cross_cache

    def _cached_cross(self, block, hidden_states, cross_attention_kwargs) -> torch.Tensor | None:
        """The cached cross-attention output when the fast path can take over, else ``None``."""
        state = self.state
        if (
            state.context.call is None
            or state.plan.cross_attention is not AttentionAction.REUSE
            or hidden_states.ndim != 3
            or hidden_states.dtype not in _FUSED_DTYPES
            or _autocast_enabled(hidden_states.device.type)
            or (cross_attention_kwargs and "gligen" in cross_attention_kwargs)
        ):
            return None
        cached = self.cross_cache.cache_of(state.context.call).lookup(state.context.call.runs, state.context.call.parts)
        norm = _feed_forward_norm(block)
        modulation = (block.scale_shift_table,) if block.norm_type == "ada_norm_single" else ()
        if cached is None or cached.shape != hidden_states.shape or not _same_place(hidden_states, norm.weight, norm.bias, cached, *modulation):
            return None
        return cached

    def forward_in_generation(self, block, hidden_states, *args, **kwargs):
        if self.state.plan.cross_attention is not AttentionAction.REUSE:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)  # before the gate: the block's own
        named = dict(zip(_BLOCK_ARGUMENTS, args), **kwargs)
        cross_attention_kwargs = named.get("cross_attention_kwargs")
        cross_output = self._cached_cross(block, hidden_states, cross_attention_kwargs)
        if cross_output is None:
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        if self.state.context.recorder is not None:
            self.state.context.recorder.attention(self.state.step, self.cross_cache.denoiser, True, reused=True)
        norm = _feed_forward_norm(block)
        pixart = block.norm_type == "ada_norm_single"
        if pixart:
            batch = hidden_states.shape[0]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.scale_shift_table[None] + named["timestep"].reshape(batch, 6, -1)
            ).chunk(6, dim=1)
            norm_hidden_states = block.norm1(hidden_states) * (1 + scale_msa) + shift_msa
        else:
            norm_hidden_states = block.norm1(hidden_states)
        attn_output = block.attn1(
            norm_hidden_states, encoder_hidden_states=None, attention_mask=named.get("attention_mask"),
            **(cross_attention_kwargs or {})
        )
        modulation = dict(gate=gate_msa, scale=scale_mlp, shift=shift_mlp) if pixart else {}
        hidden_states, norm_hidden_states = ops.post_gate_residual_norm(
            hidden_states, attn_output, cross_output, weight=norm.weight, bias=norm.bias, eps=norm.eps, **modulation
        )
        ff_output = _compat.feed_forward(block, norm_hidden_states)
        if pixart:
            ff_output = gate_mlp * ff_output
        return ff_output + hidden_states
