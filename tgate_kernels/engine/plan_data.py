"""The step plan as data, for denoisers T-GATE compiles.

A compiled graph must not depend on which step it runs, or every distinct step plan would compile
a graph of its own (and, with inductor's freezing, hold its own copy of the weights). So under
``compile=`` the attention hooks read the plan from a small tensor of flags, updated in place
before every denoiser call: whether self-attention reuses its cache, whether it stores this step's
output, whether this is the gate step, and, for separate calls, whether this call is the first of
its step. The graph computes both sides and selects with ``torch.where``; caches are tensors it
updates in place. What remains plain Python is what changes only with the phase (before or after
the gate) and the layout of the call, which is also what changes the input's shape: one graph per
input shape.

The flags and the caches reach the compiled graph as its *inputs* (one dict, :attr:`PlanData.bound`),
never as attributes of a module or a hook: inductor's freezing folds every tensor it reaches as an
attribute and does not write into a constant, so a cache read there would be the value it had when
the graph was compiled. As inputs they are also free to live for one generation only: the first
call of each layout runs eagerly and teaches the layout's tensors (name, shape, dtype, device);
every later call gets them made anew, zeroed, at the start of each generation, and released when it
ends.

The price: before the gate, self-attention is computed at the steps where it is reused (the
reference's saving there is small: a few percent of the MACs); after the gate, cross-attention is
not computed at all, as in eager T-GATE.
"""

from __future__ import annotations

import torch

from ..schedule import AttentionAction

REUSE_SELF, STORE_SELF, GATE, FIRST_PART = range(4)
FLAGS = "flags"

TensorSpec = tuple[tuple[int, ...], torch.dtype, torch.device]


class PlanData:
    """The flags of the call about to run, the caches of this generation, and the phase."""

    def __init__(self) -> None:
        self.after_gate = False
        self.bound: dict[str, torch.Tensor] | None = None
        """The tensors of the denoiser call running now: what the compiled graph takes as input."""
        self._flags: dict[torch.device, torch.Tensor] = {}
        self._tensors: dict[int, dict[str, torch.Tensor]] = {}
        """This generation's caches, by run of the denoiser in a step, then by name."""
        self._self_cached: set[str] = set()
        self._cross_cached: set[str] = set()

    def begin(self) -> None:
        self.after_gate = False
        self.release()

    def release(self) -> None:
        """Drop this generation's caches (their memory goes back) and what they recorded."""
        self._tensors.clear()
        self.bound = None
        self._self_cached.clear()
        self._cross_cached.clear()

    def flags(self, device: torch.device) -> torch.Tensor:
        flags = self._flags.get(device)
        if flags is None:
            flags = self._flags[device] = torch.zeros(4, dtype=torch.bool, device=device)
        return flags

    # -- the tensors one call takes ----------------------------------------------------------

    def bind_for_learning(self, device: torch.device, run: int) -> None:
        """Before a layout's first (eager) call: every tensor of this generation so far, which
        the call may read, and the ones it creates (:meth:`buffer`). ``run``: the call's
        :attr:`~tgate_kernels.engine.guidance.DenoiserCall.run`, whose caches are its own."""
        self.bound = {FLAGS: self.flags(device), **self._tensors.get(run, {})}

    def learned(self, run: int) -> dict[str, TensorSpec]:
        """After a layout's first call: the tensors its later calls take, by name."""
        bound, self.bound = self.bound or {}, None
        self._tensors.setdefault(run, {}).update((k, v) for k, v in bound.items() if k != FLAGS)
        return {key: (tuple(t.shape), t.dtype, t.device) for key, t in bound.items()}

    def bind(self, specs: dict[str, TensorSpec], run: int) -> dict[str, torch.Tensor]:
        """Before a compiled call: its tensors, in the order it learned them (a compiled graph
        is guarded on the names, so every run has the same), made zeroed where this generation
        has not made them yet."""
        bound, made = {}, self._tensors.setdefault(run, {})
        for key, (shape, dtype, device) in specs.items():
            if key == FLAGS:
                bound[key] = self.flags(device)
                continue
            tensor = made.get(key)
            if tensor is None or tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
                tensor = made[key] = torch.zeros(shape, dtype=dtype, device=device)
            bound[key] = tensor
        self.bound = bound
        return bound

    def existing(self, key: str) -> torch.Tensor | None:
        """The cache ``key`` of the call running if it has been made, else ``None`` (never makes one)."""
        return self.bound.get(key)

    def buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The cache ``key`` of the call running (traced under compile: ``bound`` is the graph's input)."""
        bound = self.bound
        buffer = bound.get(key)
        if buffer is None:
            buffer = bound[key] = torch.zeros_like(like)
        return buffer

    # -- the plan ----------------------------------------------------------------------------

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
