"""Which modules of a denoiser are attentions T-GATE can cache, and of which kind.

One predicate serves the engine (what it hooks) and the benchmarks (what they count), so both
speak of the same modules. The kind is a property of the *module*, decided once when T-GATE is
enabled, never from how a call happens to pass its arguments: Lumina-Next passes
``encoder_hidden_states`` to its self-attention, and it is still self-attention.

A module is cross-attention when its keys and values come from another input by construction:
diffusers says so (``is_cross_attention``: reliable where it exists, and it says *self* for
AnimateDiff's temporal ``attn2``), or, for attention classes without it (LTX-Video's,
Kandinsky 5's), its block places it where blocks put cross-attention (``attn2``, ``cross_attn``,
``cross_attention``), or its key projection reads a different width than its query projection. Attention that adds its own residual or rescales its
output (DeepFloyd IF's, the VAE's) is not cacheable: caching its output would freeze the residual
stream too. Attention that also attends to added text tokens (``added_kv_proj_dim``: SD3's and
FLUX's joint attention) mixes both kinds and is not cacheable either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from ..families.registry import SingleStreamBlock, single_stream_layout


class AttentionKind(enum.Enum):
    SELF = "self"
    CROSS = "cross"
    TEXT = "text stream"
    """A module of a joint-attention block's text stream (its q/k/v and output projections, its
    feed-forward): how the prompt reaches the image there, scheduled as cross-attention is."""
    JOINT = "joint"
    """The joint attention of a dual- or single-stream block (image and text tokens attending
    together), scheduled as self-attention is: its image and text outputs are cached together.
    The text stream's work inside it is frozen after the gate as :attr:`TEXT`."""


_CROSS_PLACES = frozenset({"attn2", "cross_attn", "cross_attention", "attn_cross"})
_SELF_PLACES = frozenset({"attn1", "self_attn", "self_attention", "attn_self"})


@dataclass(frozen=True)
class HookableAttention:
    """An attention module of a denoiser that T-GATE caches."""

    name: str
    module: torch.nn.Module
    kind: AttentionKind
    single_stream: SingleStreamBlock | None = None
    """For a single-stream block (the module is the block): how it lays out its text rows."""

    @property
    def cross(self) -> bool:
        """Whether the schedule treats it as cross-attention (cached at the gate, reused after)."""
        return self.kind in (AttentionKind.CROSS, AttentionKind.TEXT)


_PLAIN_MODULE_ATTENTIONS = frozenset({"MochiAttention"})
"""Attention classes diffusers builds on ``nn.Module`` alone (with a ``processor`` as the others)."""


def is_attention(module: torch.nn.Module) -> bool:
    return isinstance(module, (Attention, AttentionModuleMixin)) or type(module).__name__ in _PLAIN_MODULE_ATTENTIONS


def adds_own_residual(module: torch.nn.Module) -> bool:
    return (
        bool(getattr(module, "residual_connection", False))
        or getattr(module, "rescale_output_factor", 1.0) != 1.0
        or getattr(module, "spatial_norm", None) is not None
        or isinstance(getattr(module, "processor", None), _residual_processors())
    )


def _residual_processors() -> tuple[type, ...]:
    """Processors that add the attention's input to its output themselves (the added-KV
    attention of DeepFloyd IF, UnCLIP and Kandinsky UNets)."""
    from diffusers.models import attention_processor

    names = ("AttnAddedKVProcessor", "AttnAddedKVProcessor2_0", "XFormersAttnAddedKVProcessor")
    return tuple(c for c in (getattr(attention_processor, n, None) for n in names) if isinstance(c, type))


def is_joint_attention(module: torch.nn.Module) -> bool:
    # MochiAttention keeps no `added_kv_proj_dim`, only the projections it builds from it;
    # HiDream's names its text projections `to_*_t`
    return getattr(module, "added_kv_proj_dim", None) is not None or any(
        isinstance(getattr(module, name, None), torch.nn.Module) for name in ("add_k_proj", "to_k_t")
    )


def attention_kind(module: torch.nn.Module, place: str) -> AttentionKind | None:
    """The kind of attention ``module`` is (``place``: its attribute name in its parent), or
    ``None`` when it is not an attention T-GATE can cache."""
    if not is_attention(module) or adds_own_residual(module):
        return None
    declared = getattr(module, "is_cross_attention", None)
    if declared is True:
        # also with added key/value projections: Wan's image-to-video cross-attention reads
        # image tokens beside the text, still not the query's own tokens
        return AttentionKind.CROSS
    if is_joint_attention(module):
        return None
    if declared is False:
        return AttentionKind.SELF
    if place in _CROSS_PLACES:
        return AttentionKind.CROSS
    if place in _SELF_PLACES:
        return AttentionKind.SELF
    query, key = getattr(module, "to_q", None), getattr(module, "to_k", None)
    if isinstance(query, torch.nn.Linear) and isinstance(key, torch.nn.Linear) and key.in_features != query.in_features:
        return AttentionKind.CROSS
    return None


_TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t")
_TEXT_FEED_FORWARDS = ("ff_context", "txt_mlp", "ff_t")
_TEXT_REFINERS = frozenset({"HunyuanVideoTokenRefiner"})
"""Modules that rework the prompt's embeddings for the text stream every step (their output
reaches the image only through the text-stream modules, frozen after the gate)."""
_TEXT_REFINER_LISTS = frozenset({"context_refiner"})
"""A denoiser's attributes listing blocks that do that on the text rows alone (Lumina 2's)."""


def _is_text_refiner(name: str, module: torch.nn.Module) -> bool:
    if type(module).__name__ in _TEXT_REFINERS:
        return True
    parent, _, index = name.rpartition(".")
    return parent in _TEXT_REFINER_LISTS and index.isdigit()


def text_stream_modules(denoiser: torch.nn.Module) -> list[HookableAttention]:
    """The modules of the text stream of every joint-attention block of ``denoiser``. In a
    dual-stream block: the joint attention's text projections (``add_q_proj``, ``add_k_proj``,
    ``add_v_proj``, ``to_add_out``; HiDream's ``to_*_t``) and the block's text feed-forward
    (``ff_context``, Qwen-Image's ``txt_mlp``, HiDream's ``ff_t``); the image tokens see the text only through the keys and values
    these give the joint attention. A single-stream block (a registered class) is one entry: the
    block itself, whose text rows :mod:`tgate_kernels.hooks.text_rows` freezes. A text refiner
    running before the blocks (HunyuanVideo's, Lumina 2's) is frozen too."""
    modules = dict(denoiser.named_modules())
    found = []
    for name, module in modules.items():
        if _is_text_refiner(name, module):
            found.append(HookableAttention(name, module, AttentionKind.TEXT))
            continue
        layout = single_stream_layout(module, name)
        if layout is not None:
            found.append(HookableAttention(name, module, AttentionKind.TEXT, layout))
            continue
        if not (is_attention(module) and is_joint_attention(module)):
            continue
        block, _, _ = name.rpartition(".")
        places = [(f"{name}.{attribute}", getattr(module, attribute, None)) for attribute in _TEXT_PROJECTIONS]
        places += [(f"{block}.{attribute}" if block else attribute, getattr(modules.get(block), attribute, None))
                   for attribute in _TEXT_FEED_FORWARDS]
        found += [HookableAttention(place, part, AttentionKind.TEXT) for place, part in places if part is not None]
    return found


def hookable_attentions(denoiser: torch.nn.Module, text_streams: bool = False) -> list[HookableAttention]:
    """Every attention of ``denoiser`` T-GATE caches, in module order (with ``text_streams``,
    the joint attention of every dual- and single-stream block, then the text-stream modules of
    every joint-attention block; a text refiner's attention is the text stream's, not a
    self-attention of its own)."""
    streams = text_stream_modules(denoiser) if text_streams else []
    # what runs inside a single-stream block or a text refiner is the text stream's work ...
    blocks = tuple(f"{a.name}." for a in streams)
    # ... except a single-stream block's attention: its joint attention, scheduled as a dual-stream block's
    single_stream_attentions = {f"{a.name}.{a.single_stream.attention}" for a in streams if a.single_stream is not None}
    found = []
    for name, module in denoiser.named_modules():
        if name in single_stream_attentions or (
            text_streams and is_attention(module) and is_joint_attention(module) and not name.startswith(blocks)
        ):
            if not adds_own_residual(module):
                found.append(HookableAttention(name, module, AttentionKind.JOINT))
            continue
        kind = attention_kind(module, name.rpartition(".")[2])
        if kind is not None and not name.startswith(blocks):
            found.append(HookableAttention(name, module, kind))
    return found + streams
