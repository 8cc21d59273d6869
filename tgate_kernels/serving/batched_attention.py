"""Attention over a batch of requests at different steps, each gated by its own plan.

The rows of one denoiser call belong to several requests, laid out one after another, each with
its guidance parts (``[negative, prompt]`` before its gate, one row after it). For every
attention module the rows are split by request: rows whose request computes the attention at
this step go through the module's own forward together (its processor, whatever it is), the
others take what their request cached, and the output is put back in row order. What a request
caches and when is what :mod:`tgate_kernels.schedule` says for a single generation: the gate
step caches the mean of its two guidance rows, the steps after it reuse that mean for
cross-attention, and self-attention is cached and reused on the ``sp_interval`` schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine.guidance import NEGATIVE, PROMPT
from ..hooks.attention_cache import merge_text_pair
from ..schedule import AttentionAction, StepPlan


@dataclass
class RowSegment:
    """One request's rows in a denoiser call."""

    caches: dict[int, torch.Tensor]
    """The request's cached outputs, by attention module."""
    plan: StepPlan
    rows: int
    gated: bool
    """Whether the request runs T-GATE (else every attention is computed and nothing cached)."""


@dataclass
class BatchPlan:
    """The segments of the running call, in row order (empty: no batched call is running)."""

    segments: list[RowSegment] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(segment.rows for segment in self.segments)


class BatchedAttention:
    """Replaces one attention module's forward while a step batcher runs; :meth:`remove` gives it back."""

    def __init__(self, module: torch.nn.Module, cross: bool, batch: BatchPlan) -> None:
        self.module = module
        self.cross = cross
        self.batch = batch
        self.key = id(module)
        self._forward = module.forward
        module.forward = self

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    def _action(self, segment: RowSegment) -> AttentionAction:
        if not segment.gated:
            return AttentionAction.COMPUTE
        return segment.plan.cross_attention if self.cross else segment.plan.self_attention

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, **kwargs):
        segments = self.batch.segments
        if not segments:
            return self._forward(hidden_states, encoder_hidden_states, **kwargs)
        if hidden_states.shape[0] != self.batch.rows:
            raise RuntimeError(
                f"an attention module got {hidden_states.shape[0]} rows in a step batch of {self.batch.rows}: the "
                f"denoiser splits its batch in a way the step batcher cannot follow"
            )
        reused: dict[int, torch.Tensor] = {}
        computed_rows: list[torch.Tensor] = []
        start = 0
        for index, segment in enumerate(segments):
            action = self._action(segment)
            cached = segment.caches.get(self.key)
            if action is AttentionAction.REUSE and cached is not None and cached.shape[0] == segment.rows:
                reused[index] = cached
            else:
                computed_rows.append(torch.arange(start, start + segment.rows, device=hidden_states.device))
            start += segment.rows
        computed = None
        if computed_rows:
            rows = torch.cat(computed_rows)
            everything = len(rows) == hidden_states.shape[0]
            pick = (lambda tensor: tensor) if everything else (lambda tensor: tensor.index_select(0, rows))
            computed = self._forward(
                pick(hidden_states),
                None if encoder_hidden_states is None else pick(encoder_hidden_states),
                **{name: pick(value) if _per_row(value, hidden_states) else value for name, value in kwargs.items()},
            )
        pieces, offset = [], 0
        for index, segment in enumerate(segments):
            if index in reused:
                pieces.append(reused[index])
                continue
            output = computed[offset: offset + segment.rows]
            offset += segment.rows
            self._keep(segment, output)
            pieces.append(output)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _keep(self, segment: RowSegment, output: torch.Tensor) -> None:
        """What the request caches of a computed output at this step."""
        if self._action(segment) is not AttentionAction.CACHE:
            return
        if segment.plan.average_cfg_halves and segment.rows == 2:
            segment.caches[self.key] = merge_text_pair(output, (NEGATIVE, PROMPT))[0]
        else:
            segment.caches[self.key] = output


def _per_row(value, like: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == like.shape[0]
