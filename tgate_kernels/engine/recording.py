"""What T-GATE's hooks did in a generation, step by step, for whoever asks.

Recording is opt-in: ``with tgate_kernels.view(pipe).record() as record: pipe(...)`` attaches a
:class:`StepRecorder` for the duration of the block, and the hooks only pay for an ``is None``
check otherwise. Nothing is recorded while ``torch.compile`` traces: counts keyed by step would
make every step a new graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RecordedCall:
    """One denoiser call: the rows its inputs carried and the rows that ran (0 when the call was
    answered with another call's result)."""

    denoiser: str
    parts: tuple[str, ...]
    runs: tuple[str, ...]
    rows: int
    rows_run: int


class StepRecorder:
    """Which attentions ran or were reused at each step of the last generation, and the rows
    each denoiser call ran on (``view(pipe).record()``)."""

    def __init__(self) -> None:
        self.num_steps = 0
        self._attention: Counter = Counter()
        self._calls: dict[int, list[RecordedCall]] = {}

    def generation_started(self, state) -> None:
        """A recorder keeps the last generation only."""
        self.num_steps = state.num_steps
        self._attention.clear()
        self._calls.clear()

    def attention(self, step: int, denoiser: str, cross: bool, reused: bool) -> None:
        if not torch.compiler.is_compiling():
            self._attention[(step, denoiser, cross, reused)] += 1

    def denoiser_call(self, step: int, call: RecordedCall) -> None:
        if not torch.compiler.is_compiling():
            self._calls.setdefault(step, []).append(call)

    # -- reading ---------------------------------------------------------------------------

    def _count(self, step: int, cross: bool, reused: bool, denoiser: str | None) -> int:
        return sum(
            n for (s, name, c, r), n in self._attention.items() if (s, c, r) == (step, cross, reused) and denoiser in (None, name)
        )

    def computed(self, step: int, cross: bool, denoiser: str | None = None) -> int:
        """Attention calls of that kind that ran at ``step`` (in ``denoiser``, or in all)."""
        return self._count(step, cross, False, denoiser)

    def reused(self, step: int, cross: bool, denoiser: str | None = None) -> int:
        """Attention calls of that kind answered from the cache at ``step``."""
        return self._count(step, cross, True, denoiser)

    def calls(self, step: int, denoiser: str | None = None) -> list[RecordedCall]:
        return [call for call in self._calls.get(step, []) if denoiser in (None, call.denoiser)]

    def rows_run(self, step: int, denoiser: str | None = None) -> list[int]:
        """Rows each denoiser call of ``step`` ran on (0: answered with another call's result)."""
        return [call.rows_run for call in self.calls(step, denoiser)]

    @property
    def steps(self) -> list[int]:
        return sorted(self._calls)
