"""Multiply-accumulates of a whole generation's denoiser work, with and without T-GATE.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (full-size
architectures cost no compute there); MACs = FLOPs / 2. The counter sees matrix products and
convolutions, which is where all the MACs of these denoisers are.

Counting convention. The attention-score products (QKᵀ and PV, i.e. ``scaled_dot_product_attention``)
are tracked separately: the published table's baselines (counted with calflops, which does not see
``scaled_dot_product_attention``) are reproduced exactly when they are left out, so every count
carries both numbers. On ``meta`` that function would decompose into ``bmm``, which a linear
layer on a non-contiguous batch also dispatches to; while counting, it is therefore routed to the
single ``_scaled_dot_product_efficient_attention`` operator, so scores are told apart by operator
alone and batch size cannot move MACs between the two columns.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ... import _compat
from ...engine.attention_modules import hookable_attentions
from ...config import TgateConfig
from ...schedule import AttentionAction, plan_generation
from .architectures import Architecture
from .denoising_loop import DenoisingLoop, denoiser_inputs

ATTENTION_SCORE_OPS = _compat.attention_score_ops()
"""Operators holding attention scores (see :func:`attention_as_one_operator`)."""


@contextlib.contextmanager
def attention_as_one_operator():
    """Route ``F.scaled_dot_product_attention`` on ``meta`` tensors to one counted operator."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def counted(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            # grouped-query attention: each key/value head serves several query heads
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
        bias = None
        if attn_mask is not None:
            bias = attn_mask.expand(*query.shape[:-1], key.shape[-2])
        return _compat.efficient_attention(query, key, value, bias, dropout_p, is_causal, scale)

    functional.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@dataclass(frozen=True)
class MacsCount:
    """MACs of some work; ``total`` includes ``attention_scores``."""

    total: int
    attention_scores: int

    @property
    def without_attention_scores(self) -> int:
        return self.total - self.attention_scores

    def __add__(self, other: "MacsCount") -> "MacsCount":
        return MacsCount(self.total + other.total, self.attention_scores + other.attention_scores)

    def __sub__(self, other: "MacsCount") -> "MacsCount":
        return MacsCount(self.total - other.total, self.attention_scores - other.attention_scores)

    def __mul__(self, factor: int) -> "MacsCount":
        return MacsCount(self.total * factor, self.attention_scores * factor)

    __rmul__ = __mul__


ZERO = MacsCount(0, 0)


def _is_score_op(op) -> bool:
    return op in ATTENTION_SCORE_OPS or getattr(op, "overloadpacket", None) in ATTENTION_SCORE_OPS


def macs_from_op_flops(op_flops: dict) -> MacsCount:
    """MACs from a ``{operator: FLOPs}`` mapping as ``FlopCounterMode`` reports it."""
    total = sum(op_flops.values())
    scores = sum(flops for op, flops in op_flops.items() if _is_score_op(op))
    return MacsCount(total // 2, scores // 2)


def count_macs(work) -> MacsCount:
    """MACs of everything ``work()`` runs."""
    with attention_as_one_operator(), FlopCounterMode(display=False) as counter:
        work()
    return macs_from_op_flops(counter.get_flop_counts().get("Global", {}))


def generation_macs(
    arch: Architecture,
    tgate: TgateConfig | None,
    steps: int | None = None,
    resolution: int | None = None,
    denoiser: torch.nn.Module | None = None,
) -> MacsCount:
    """MACs of one generation's denoiser calls on ``meta``. ``tgate`` is ``None`` for the plain
    pipeline, else the config ``tgate_kernels.enable`` gets (the loop runs through the
    very hooks a real pipeline gets)."""
    from ... import api

    denoiser = denoiser if denoiser is not None else arch.build_denoiser("meta")
    loop = DenoisingLoop(arch, denoiser, arch.cfg)
    steps = steps or arch.steps
    if tgate is not None:
        api.enable(loop, config=tgate)
    try:
        return count_macs(lambda: loop.run(steps, resolution))
    finally:
        if tgate is not None:
            api.disable(loop)


@dataclass(frozen=True)
class ForwardBreakdown:
    """MACs of one denoiser call on a single latent, and the parts held by its self- and
    cross-attention modules (projections and scores; ``norm2`` holds no MACs); in a
    joint-attention denoiser the text-stream modules count as cross-attention, and of a
    single-stream block its text rows' share of the work outside the attention scores (after the
    gate the block runs its image rows; its attention still computes every query row)."""

    total: MacsCount
    self_attention: MacsCount
    cross_attention: MacsCount
    nested: MacsCount = ZERO
    """Work counted in both: text-stream modules inside a joint attention (its text projections,
    a single-stream block's text rows of its attention's projections). A step reusing both kinds
    skips it once."""

    def attention(self, cross: bool) -> MacsCount:
        return self.cross_attention if cross else self.self_attention

    def reused(self, self_attention: bool, cross_attention: bool) -> MacsCount:
        """What a step skips when it reuses the self- and/or the cross-attention kind."""
        skipped = ZERO
        if self_attention:
            skipped = skipped + self.self_attention
        if cross_attention:
            skipped = skipped + self.cross_attention
        if self_attention and cross_attention:
            skipped = skipped - self.nested
        return skipped


def forward_breakdown(arch: Architecture, resolution: int | None = None, denoiser: torch.nn.Module | None = None) -> ForwardBreakdown:
    denoiser = denoiser if denoiser is not None else arch.build_denoiser("meta")
    attentions = hookable_attentions(denoiser, arch.text_streams)
    attention_kind = {attention.name: attention.cross for attention in attentions if attention.single_stream is None}
    row_layers: dict[str, tuple[int, int]] = {}
    """Layers of single-stream blocks that run per row of the joint sequence: their text rows,
    their rows."""
    watches = [
        watch
        for attention in attentions if attention.single_stream is not None
        for watch in _watch_row_layers(row_layers, attention)
    ]
    args, kwargs = denoiser_inputs(arch, 1, resolution)
    try:
        with attention_as_one_operator(), FlopCounterMode(display=False) as counter, torch.no_grad():
            denoiser(*args, **kwargs)
    finally:
        for watch in watches:
            watch.remove()
    parts = {False: ZERO, True: ZERO}
    nested = ZERO
    total = ZERO
    self_paths = tuple(f"{path}." for path, cross in attention_kind.items() if not cross)
    for qualified_name, op_flops in counter.get_flop_counts().items():
        if qualified_name == "Global":
            total = macs_from_op_flops(op_flops)
            continue
        # The counter names modules "<RootClass>.<path>"; the path is what named_modules() gives.
        _, _, path = qualified_name.partition(".")
        if path in row_layers:
            text, rows = row_layers[path]
            share, cross = MacsCount(macs_from_op_flops(op_flops).total * text // rows, 0), True
        elif path in attention_kind:
            share, cross = macs_from_op_flops(op_flops), attention_kind[path]
        else:
            continue
        parts[cross] += share
        if cross and path.startswith(self_paths):
            nested += share
    return ForwardBreakdown(total=total, self_attention=parts[False], cross_attention=parts[True], nested=nested)


def _watch_row_layers(row_layers: dict[str, tuple[int, int]], attention) -> list:
    """Pre-hooks on a single-stream block and its ``Linear`` layers, noting each layer that runs
    on the rows of the block's joint sequence (not, say, its modulation from the timestep)."""
    layout = attention.single_stream
    block = attention.module
    seen: dict[str, int] = {}
    if layout.text_argument is None:
        return []  # a joined sequence does not say its text rows here: its saving is left out

    def on_block(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        seen["text"] = bound[layout.text_argument].shape[1]
        seen["rows"] = seen["text"] + bound[layout.image_argument].shape[1]

    def on_layer(name):
        def watch(module, args):
            if args[0].dim() >= 3 and args[0].shape[1] == seen.get("rows"):
                row_layers[f"{attention.name}.{name}"] = (seen["text"], seen["rows"])
        return watch

    watches = [block.register_forward_pre_hook(on_block, with_kwargs=True)]
    watches += [layer.register_forward_pre_hook(on_layer(name))
                for name, layer in block.named_modules() if isinstance(layer, torch.nn.Linear)]
    return watches


def planned_generation_macs(
    breakdown: ForwardBreakdown,
    settings: TgateConfig | None,
    steps: int,
    cfg: bool,
    parts: int | None = None,
    parts_after_gate: int | None = None,
) -> MacsCount:
    """MACs of a generation derived from the schedule alone: each step costs the full forward
    on its batch, less the attention modules its plan reuses. ``settings=None`` is the plain
    pipeline. A reuse with nothing cached yet computes, as in the engine.

    The guided batch holds ``parts`` latents per prompt (2 with ``cfg``, else 1; PAG's is 3) and
    ``parts_after_gate`` after the gate (1 when guidance is dropped; PAG keeps its perturbed part: 2).
    """
    parts = parts if parts is not None else (2 if cfg else 1)
    parts_after_gate = parts_after_gate if parts_after_gate is not None else 1
    if settings is None:
        return breakdown.total * (parts * steps)
    cached = {False: False, True: False}
    total = ZERO
    for plan in plan_generation(settings, steps):
        reused = {}
        for cross, action in ((False, plan.self_attention), (True, plan.cross_attention)):
            reused[cross] = action is AttentionAction.REUSE and cached[cross]
            if action is AttentionAction.CACHE:
                cached[cross] = True
        step = breakdown.total - breakdown.reused(reused[False], reused[True])
        total = total + step * (parts if plan.cfg_batch else min(parts, parts_after_gate))
    return total
