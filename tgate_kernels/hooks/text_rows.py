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
the image rows alone, giving zeros or the gate step's rows for the text ones.

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


class BlockRows:
    """What one block's taps do in its running call, set by the block's hook."""

    def __init__(self, layout: SingleStreamBlock) -> None:
        self.layout = layout
        self.mode = RowsMode.PASS
        self.text_rows = 0
        self.captured: dict[str, torch.Tensor] = {}
        self.injected: dict[str, torch.Tensor] = {}

    def text_of(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        return rows[:, :count] if self.layout.text_first else rows[:, rows.shape[1] - count:]

    def image_of(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        return rows[:, count:] if self.layout.text_first else rows[:, : rows.shape[1] - count]

    def joined(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        pieces = (text.to(image.dtype), image) if self.layout.text_first else (image, text.to(image.dtype))
        return torch.cat(pieces, dim=1)

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
            if rows.layout.keeps_text_rows:
                return rows.joined(rows.injected[self.projection], rows.image_rows_through(self.fn_ref, args, kwargs))
            return rows.joined(rows.injected[self.projection], self.fn_ref.original_forward(*args, **kwargs))
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
        return rows.joined(image.new_zeros(image.shape[0], rows.text_rows, *image.shape[2:]), image)


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

    def _text_count(self, bound: inspect.BoundArguments) -> int:
        """The text rows of this call of the block."""
        if self.layout.text_argument is not None:
            return bound.arguments[self.layout.text_argument].shape[1]
        context = self.state.context
        seen = context.text_rows
        if seen is None or seen[0] is not context.call:
            raise RuntimeError(
                f"`{self.key}` takes its text and image rows joined, and no dual-stream block's text stream ran before it "
                f"in this call of `{self.denoiser}` to say how many of the rows are text."
            )
        return seen[1]

    def _split(self, output, text_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text output, image output) of the block's output."""
        if self.layout.text_argument is None:
            return output[:, :text_rows], output[:, text_rows:]
        first, second = output
        return (first, second) if self.layout.returns_text_first else (second, first)

    def _joined(self, text_output: torch.Tensor, image_output: torch.Tensor):
        """The block's output from its text and image outputs."""
        if self.layout.text_argument is None:
            return torch.cat([text_output, image_output], dim=1)
        return (text_output, image_output) if self.layout.returns_text_first else (image_output, text_output)

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
        count = cached.shape[1]
        width = cached.shape[-1] - sum(self.widths)
        text_output, *projected = cached.split([width, *self.widths], dim=-1)
        bound = self._arguments(args, kwargs)
        if self.layout.keeps_text_rows:
            pass  # the block cuts its sequence by the text rows' count: the taps skip their work instead
        elif self.layout.text_argument is None:
            joined = bound.arguments[self.layout.image_argument]
            bound.arguments[self.layout.image_argument] = joined[:, count:]
        else:
            bound.arguments[self.layout.text_argument] = bound.arguments[self.layout.text_argument][:, :0]
        rows.mode, rows.text_rows = RowsMode.INJECT, count
        rows.injected = dict(zip(self.projections, projected))
        try:
            output = self.fn_ref.original_forward(*bound.args, **bound.kwargs)
        finally:
            rows.mode, rows.injected = RowsMode.PASS, {}
        _, image_output = self._split(output, 0)
        return self._joined(text_output.to(image_output.dtype), image_output)


_compat.diffusers_hook(ProjectionTap, stateful=False)
_compat.diffusers_hook(AttentionTap, stateful=False)
_compat.diffusers_hook(RowTap, stateful=False)
_compat.diffusers_hook(TextRowsHook, stateful=True)
