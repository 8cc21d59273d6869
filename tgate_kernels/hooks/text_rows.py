"""Freezing the text rows of a single-stream joint-attention block.

A single-stream block (FLUX's second half, Chroma's, AuraFlow's DiT blocks) runs one set of
layers over the text and image rows of one sequence, given to it apart (FLUX) or joined, text
first, their count the text rows of the dual-stream blocks before it (Chroma, AuraFlow). After
the gate its text rows are frozen, as a dual-stream block's text stream is: the block runs on the
image rows alone (its norms, projections, feed-forward and output projection see no text row),
its attention projections get the text rows they gave at the gate put back beside the image
rows, so the image attends to the gate step's text keys and values with the positions (RoPE)
they had, and the block's text output is the one it gave at the gate.

A block that cuts its sequence by the text rows' count (HunyuanVideo's single-stream blocks,
CogVideoX's) cannot run without them: it gets them as before, and taps on its row-wise modules
(:attr:`~tgate_kernels.families.registry.SingleStreamBlock.row_modules`) and projections compute
the image rows alone, giving zeros or the gate step's rows for the text ones. So does Lumina 2's,
whose samples each have their own text length: a tap on the module that reads the text mask
(:attr:`~tgate_kernels.families.registry.SingleStreamBlock.text_mask`) counts them once a call,
and the image rows are gathered and put back at each sample's own offset.

What is cached is one tensor a block: the block's text output and its projections' text rows,
side by side along the features (every piece has the batch and the text rows as its first two
dimensions), so the caching, the mean over the guidance parts at the gate and the compiled
path's buffers are :class:`~.attention_cache.AttentionCacheHook`'s. Taps on the projections and
the attention carry the rows in and out; they do nothing unless their block's hook says so.
"""

from __future__ import annotations

import enum
import inspect

import torch

from .. import _compat
from ..engine.generation import GenerationState
from ..families.registry import SingleStreamBlock
from .attention_cache import AttentionCacheHook
from .base import TgateHook


class RowsMode(enum.Enum):
    PASS = "pass"
    CAPTURE = "capture"
    INJECT = "inject"


TextCount = int | tuple[int, ...]
"""A call's text rows: one count for every sample, or each sample's (text first, then its image
rows, then padding up to the longest sample's; see ``SingleStreamBlock.text_mask``)."""


def _widest(count: TextCount) -> int:
    return max(count) if isinstance(count, tuple) else count


def _image_index(count: tuple[int, ...], image_rows: int, like: torch.Tensor) -> torch.Tensor:
    """The rows of each sample's image, as an index for ``gather``/``scatter`` along dim 1 of ``like``."""
    start = torch.tensor(count, device=like.device)
    index = start[:, None] + torch.arange(image_rows, device=like.device)
    return index.view(*index.shape, *([1] * (like.ndim - 2))).expand(-1, -1, *like.shape[2:])


class BlockRows:
    """What one block's taps do in its running call, set by the block's hook."""

    def __init__(self, layout: SingleStreamBlock) -> None:
        self.layout = layout
        self.mode = RowsMode.PASS
        self.text_rows: TextCount = 0
        self.captured: dict[str, torch.Tensor] = {}
        self.injected: dict[str, torch.Tensor] = {}

    def text_of(self, rows: torch.Tensor, count: TextCount) -> torch.Tensor:
        """The text rows of ``rows`` (each sample's, padded to the longest text's)."""
        count = _widest(count)
        return rows[:, :count] if self.layout.text_first else rows[:, rows.shape[1] - count:]

    def image_of(self, rows: torch.Tensor, count: TextCount) -> torch.Tensor:
        if isinstance(count, tuple):
            return rows.gather(1, _image_index(count, rows.shape[1] - max(count), rows))
        return rows[:, count:] if self.layout.text_first else rows[:, : rows.shape[1] - count]

    def joined(self, text: torch.Tensor, image: torch.Tensor, count: TextCount) -> torch.Tensor:
        """The joint sequence of ``text`` (as :meth:`text_of` gives it) and ``image`` rows."""
        text = text.to(image.dtype)
        if isinstance(count, tuple):
            longest = max(count)
            # a shorter text's rows past its own end are another row's: its padding is zeros
            own = torch.arange(longest, device=text.device)[None, :] < torch.tensor(count, device=text.device)[:, None]
            joined = image.new_zeros(image.shape[0], longest + image.shape[1], *image.shape[2:])
            joined[:, :longest] = text * own.view(*own.shape, *([1] * (text.ndim - 2)))
            return joined.scatter(1, _image_index(count, image.shape[1], image), image)
        return torch.cat((text, image) if self.layout.text_first else (image, text), dim=1)

    def image_rows_through(self, fn_ref, args: tuple, kwargs: dict) -> torch.Tensor:
        """A row-wise module's output on the image rows of its input (its first argument)."""
        if args:
            return fn_ref.original_forward(self.image_of(args[0], self.text_rows), *args[1:], **kwargs)
        name, first = next(iter(kwargs.items()))
        return fn_ref.original_forward(**{**kwargs, name: self.image_of(first, self.text_rows)})


class ProjectionTap(TgateHook):
    """On an attention projection of a single-stream block: keeps its text rows at the gate, puts
    them back beside the image rows after it."""

    name = "tgate_text_rows_projection"

    def __init__(self, state: GenerationState, rows: BlockRows, projection: str) -> None:
        super().__init__(state)
        self.rows = rows
        self.projection = projection

    def forward_in_generation(self, module, *args, **kwargs):
        rows = self.rows
        if rows.mode is RowsMode.INJECT:
            image = (rows.image_rows_through(self.fn_ref, args, kwargs) if rows.layout.keeps_text_rows
                     else self.fn_ref.original_forward(*args, **kwargs))
            return rows.joined(rows.injected[self.projection], image, rows.text_rows)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if rows.mode is RowsMode.CAPTURE:
            rows.captured[self.projection] = rows.text_of(output, rows.text_rows)
        return output


class RowTap(TgateHook):
    """On a module working row by row on the joint sequence of a block that keeps its text rows
    after the gate: computes the image rows alone then; the text rows it gives are zeros, which
    reach only the block's text output (the gate step's is returned instead)."""

    name = "tgate_text_rows_row_module"

    def __init__(self, state: GenerationState, rows: BlockRows) -> None:
        super().__init__(state)
        self.rows = rows

    def forward_in_generation(self, module, *args, **kwargs):
        rows = self.rows
        if rows.mode is not RowsMode.INJECT:
            return self.fn_ref.original_forward(*args, **kwargs)
        image = rows.image_rows_through(self.fn_ref, args, kwargs)
        text = image.new_zeros(image.shape[0], _widest(rows.text_rows), *image.shape[2:])
        return rows.joined(text, image, rows.text_rows)


class AttentionTap(TgateHook):
    """On a single-stream block's attention: after the gate its output covers the text rows put
    back by the projections too; the block takes the image rows' alone."""

    name = "tgate_text_rows_attention"

    def __init__(self, state: GenerationState, rows: BlockRows) -> None:
        super().__init__(state)
        self.rows = rows

    def forward_in_generation(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        rows = self.rows
        if rows.mode is RowsMode.INJECT:
            return rows.image_of(output, rows.text_rows)
        return output


class TextRowsHook(AttentionCacheHook):
    """On a single-stream block: caches its text output and its projections' text rows at the
    gate (scheduled as cross-attention), runs it on the image rows alone after the gate."""

    name = "tgate_text_rows"

    def __init__(
        self, state: GenerationState, denoiser: str, block: torch.nn.Module, layout: SingleStreamBlock,
        plan_as_data: bool = False, module_name: str = "",
    ) -> None:
        super().__init__(state, denoiser, cross=True, plan_as_data=plan_as_data, module_name=module_name)
        self.rows = BlockRows(layout)
        self.layout = layout
        attention = getattr(block, layout.attention)
        self.projections = {name: getattr(attention, name) for name in layout.projections}
        self.widths = [module.out_features for module in self.projections.values()]
        self._signature = inspect.signature(block.forward)

    def taps(self, block: torch.nn.Module) -> list[tuple[torch.nn.Module, TgateHook]]:
        """The hooks that carry this block's rows, with the modules they go on."""
        taps: list[tuple[torch.nn.Module, TgateHook]] = [
            (module, ProjectionTap(self.state, self.rows, name)) for name, module in self.projections.items()
        ]
        if self.layout.keeps_text_rows:
            taps += [(block.get_submodule(path), RowTap(self.state, self.rows)) for path in self.layout.row_modules]
        else:
            taps.append((getattr(block, self.layout.attention), AttentionTap(self.state, self.rows)))
        return taps

    def _arguments(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        return self._signature.bind(*args, **kwargs)

    def _text_count(self, bound: inspect.BoundArguments) -> TextCount:
        """The text rows of this call of the block."""
        if self.layout.text_argument is not None:
            return bound.arguments[self.layout.text_argument].shape[1]
        context = self.state.context
        if self.layout.text_mask is not None:
            seen = context.text_lengths
            if seen is None or seen[0] is not context.call:
                module, argument = self.layout.text_mask
                raise RuntimeError(
                    f"`{self.key}` takes its text and image rows joined, and its denoiser's `{module}` did not read "
                    f"the text mask (`{argument}`) in this call of `{self.denoiser}` to say how many of the rows are text."
                )
            return seen[1]
        seen = context.text_rows
        if seen is None or seen[0] is not context.call:
            raise RuntimeError(
                f"`{self.key}` takes its text and image rows joined, and no dual-stream block's text stream ran before it "
                f"in this call of `{self.denoiser}` to say how many of the rows are text."
            )
        return seen[1]

    def _split(self, output, text_rows: TextCount) -> tuple[torch.Tensor, torch.Tensor]:
        """(text output, image output) of the block's output."""
        if self.layout.text_argument is None:
            return self.rows.text_of(output, text_rows), self.rows.image_of(output, text_rows)
        first, second = output
        return (first, second) if self.layout.returns_text_first else (second, first)

    def computed(self, keeps: bool, args: tuple, kwargs: dict):
        """The block's output and its text rows' count, with (``keeps``) what is cached of it: its
        text output and its projections' text rows, side by side."""
        rows = self.rows
        bound = self._arguments(args, kwargs)
        count = self._text_count(bound)
        if not keeps:
            return self.fn_ref.original_forward(*args, **kwargs), count, None
        rows.mode, rows.text_rows, rows.captured = RowsMode.CAPTURE, count, {}
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
            captured = rows.captured
        finally:
            rows.mode, rows.captured = RowsMode.PASS, {}
        missing = [name for name in self.projections if name not in captured]
        if missing:
            raise RuntimeError(
                f"`{self.key}`: the projections {missing} T-GATE hooked did not run in this call (were the attention's "
                f"projections fused, or the modules replaced, after T-GATE was enabled?), so its text rows cannot be "
                f"frozen. Call tgate_kernels.disable(pipe) and enable it again after changing the model."
            )
        text_output, _ = self._split(output, count)
        pieces = [text_output] + [captured[name].to(text_output.dtype) for name in self.projections]
        return output, count, torch.cat(pieces, dim=-1)

    def kept_of(self, output) -> torch.Tensor:
        return output[2]

    def observed(self, output) -> torch.Tensor:
        return self._split(output[0], output[1])[0]

    def returned(self, output):
        return output[0]

    def reused(self, cached: torch.Tensor, args: tuple, kwargs: dict):
        rows = self.rows
        bound = self._arguments(args, kwargs)
        # each sample's count, where the mask gives them, else the rows the gate step cached
        count = self._text_count(bound) if self.layout.text_mask is not None else cached.shape[1]
        width = cached.shape[-1] - sum(self.widths)
        text_output, *projected = cached.split([width, *self.widths], dim=-1)
        layout = self.layout
        if layout.keeps_text_rows:
            pass  # the block cannot run without its text rows: the taps skip their work instead
        elif layout.text_argument is None:
            bound.arguments[layout.image_argument] = rows.image_of(bound.arguments[layout.image_argument], count)
        else:
            bound.arguments[layout.text_argument] = bound.arguments[layout.text_argument][:, :0]
        rows.mode, rows.text_rows = RowsMode.INJECT, count
        rows.injected = dict(zip(self.projections, projected))
        try:
            output = self.fn_ref.original_forward(*bound.args, **bound.kwargs)
        finally:
            rows.mode, rows.injected = RowsMode.PASS, {}
        if layout.text_argument is None:
            image_output = rows.image_of(output, count) if layout.keeps_text_rows else output
            return rows.joined(text_output, image_output, count)
        text_output = text_output.to(output[0].dtype)
        image_output = output[1] if layout.returns_text_first else output[0]
        return (text_output, image_output) if layout.returns_text_first else (image_output, text_output)


class TextMaskTap(TgateHook):
    """On the denoiser's module that reads the text mask (``SingleStreamBlock.text_mask``):
    records each sample's text rows for the blocks of this call (one host read a call, as the
    module itself makes)."""

    name = "tgate_text_rows_mask"

    def __init__(self, state: GenerationState, module: torch.nn.Module, argument: str) -> None:
        super().__init__(state)
        self.argument = argument
        self._signature = inspect.signature(module.forward)

    def forward_in_generation(self, module, *args, **kwargs):
        context = self.state.context
        if context.call is not None:
            mask = self._signature.bind(*args, **kwargs).arguments[self.argument]
            counts = tuple(int(c) for c in mask.sum(dim=1).tolist())
            context.text_lengths = (context.call, counts[0] if len(set(counts)) == 1 else counts)
        return self.fn_ref.original_forward(*args, **kwargs)


def text_mask_taps(state: GenerationState, denoiser: torch.nn.Module, layouts) -> list[tuple[torch.nn.Module, TgateHook]]:
    """One tap on each module of ``denoiser`` that the single-stream ``layouts`` read their text masks from."""
    places = sorted({layout.text_mask for layout in layouts if layout.text_mask is not None})
    modules = [(denoiser.get_submodule(path), argument) for path, argument in places]
    return [(module, TextMaskTap(state, module, argument)) for module, argument in modules]


_compat.diffusers_hook(ProjectionTap, stateful=False)
_compat.diffusers_hook(AttentionTap, stateful=False)
_compat.diffusers_hook(RowTap, stateful=False)
_compat.diffusers_hook(TextMaskTap, stateful=False)
_compat.diffusers_hook(TextRowsHook, stateful=True)
