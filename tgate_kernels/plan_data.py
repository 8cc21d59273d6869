"""The step plan as data, for denoisers T-GATE compiles.

A compiled graph must not depend on which step it runs, or every distinct step plan would compile
a graph of its own (and, with inductor's freezing, hold its own copy of the weights). So under
``compile=`` the attention hooks read the plan from a small tensor of flags, updated in place
before every denoiser call: whether self-attention reuses its cache, whether it stores this step's
output, whether this is the gate step, and, for separate calls, whether this call is the first of
its step. The graph computes both sides and selects with ``torch.where``; caches are buffers it
updates in place. What remains plain Python is what changes only with the phase (before or after
the gate) and the layout of the call, which is also what changes the input's shape: one graph per
input shape.

The price: before the gate, self-attention is computed at the steps where it is reused (the
reference's saving there is small: a few percent of the MACs); after the gate, cross-attention is
not computed at all, as in eager T-GATE.
"""

from __future__ import annotations

import torch

from .schedule import AttentionAction

REUSE_SELF, STORE_SELF, GATE, FIRST_PART = range(4)


class PlanData:
    """The flags of the call about to run, per device, and the phase."""

    def __init__(self) -> None:
        self.after_gate = False
        self._flags: dict[torch.device, torch.Tensor] = {}
        self._self_cached: set[str] = set()
        self._cross_cached: set[str] = set()

    def begin(self) -> None:
        self.after_gate = False
        self._self_cached.clear()
        self._cross_cached.clear()

    def flags(self, device: torch.device) -> torch.Tensor:
        flags = self._flags.get(device)
        if flags is None:
            flags = self._flags[device] = torch.zeros(4, dtype=torch.bool, device=device)
        return flags

    def cross_ready(self, denoiser: str) -> bool:
        """Whether ``denoiser``'s cross-attention outputs after the gate are in their buffers."""
        return denoiser in self._cross_cached

    def prepare(self, denoiser: str, plan, first_part: bool, device: torch.device) -> None:
        """Set the flags for ``denoiser``'s next call under ``plan``."""
        self.after_gate = not plan.cfg_batch
        values = [False] * 4
        values[REUSE_SELF] = plan.self_attention is AttentionAction.REUSE and denoiser in self._self_cached
        values[STORE_SELF] = plan.self_attention is AttentionAction.CACHE
        values[GATE] = plan.average_cfg_halves
        values[FIRST_PART] = first_part
        self.flags(device).copy_(torch.tensor(values))

    def finished(self, denoiser: str, plan, fills_cross: bool) -> None:
        """Book what ``denoiser``'s call just cached."""
        if plan.self_attention is AttentionAction.CACHE:
            self._self_cached.add(denoiser)
        if plan.average_cfg_halves or (self.after_gate and fills_cross):
            self._cross_cached.add(denoiser)
