"""How a pipeline guides its denoisers, and what T-GATE makes of it after the gate.

A guided denoising step evaluates the same latents several times, once per *part*: the prompt and
the negative prompt for classifier-free guidance (CFG), and in some pipelines more (PAG's
perturbed pass, InstructPix2Pix's pass without the input image). Pipelines put the parts side by
side along the batch (*batched*: SD, SDXL, PixArt, Sana, ...) or run one denoiser call per part
(*separate calls*: Wan, SkyReels-V2, Cosmos, Kandinsky 5).

After the gate T-GATE drops classifier-free guidance: the prompt and negative-prompt parts are
*merged*. One of them, the kept part, runs; its result stands for both, so the pipeline's own
``negative + g * (prompt - negative)`` collapses to it. Caches taken at the gate hold the mean
over the two, as the reference's do. Other parts keep running: they guide by something that does
not settle when cross-attention does (PAG's perturbed self-attention, InstructPix2Pix's input
image).

The layout is decided once per generation, at the first denoiser call, from what the pipeline
says (``do_classifier_free_guidance``), the rows of that call against the latent batch, and the
``cache_context`` names diffusers pipelines open around separate calls; it follows the pipeline
when a callback switches guidance off mid-run. Which inputs carry the parts is known by argument
name (:mod:`.guided_arguments`), never guessed from a shape.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, replace

import torch

from ..config import KeptPart
from ..families.registry import NEGATIVE, PROMPT

MERGED = "merged"

TEXT_PAIR = (NEGATIVE, PROMPT)

_CONTEXT_PARTS = {"cond": PROMPT, "uncond": NEGATIVE}


class GuidanceNotRecognised(RuntimeError):
    """T-GATE cannot tell how a pipeline guides its denoiser."""


class Mode(enum.Enum):
    NONE = "no guidance"
    BATCHED = "batched"
    SEPARATE = "separate calls"


@dataclass(frozen=True)
class GuidanceLayout:
    """The parts of a guided step, in batch order (batched) or call order (separate calls),
    and which of the text pair runs after the gate."""

    mode: Mode
    parts: tuple[str, ...]
    kept: str = NEGATIVE

    @property
    def merges(self) -> bool:
        """Whether there is classifier-free guidance to drop after the gate."""
        return NEGATIVE in self.parts and PROMPT in self.parts

    def after_gate(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        """``parts`` with the text pair merged into one part, at the place of the first of it."""
        if not self.merges:
            return parts
        merged: list[str] = []
        for part in parts:
            name = MERGED if part in TEXT_PAIR else part
            if name not in merged:
                merged.append(name)
        return tuple(merged)

    def describe(self) -> str:
        if self.mode is Mode.NONE:
            return "no guidance"
        return f"{self.mode.value} [{', '.join(self.parts)}], {self.kept} part kept after the gate"


NO_GUIDANCE = GuidanceLayout(Mode.NONE, (PROMPT,))


@dataclass(frozen=True)
class DenoiserCall:
    """One denoiser call: the parts its inputs carry and the parts that actually run.

    ``replay`` is set for a call that does not run at all (a separate-call part merged into the
    kept one after the gate): its result is the kept call's.
    """

    denoiser: str
    parts: tuple[str, ...]
    runs: tuple[str, ...]
    replay: bool = False
    keep_for_replay: bool = False
    run: int = 0
    """Which run of this denoiser on these parts at this timestep within the step: a pipeline
    that denoises several regions per step (MultiDiffusion's views, tiles) calls it once per
    region at the same timestep, and each region keeps caches of its own."""

    @property
    def cut(self) -> bool:
        """Whether the call runs on fewer parts than its inputs carry."""
        return len(self.runs) < len(self.parts) and not self.replay


def part_rows(tensor: torch.Tensor, parts: tuple[str, ...], wanted: tuple[str, ...], kept: str,
              interleaved: bool = False) -> torch.Tensor:
    """The rows of ``wanted`` parts of ``tensor`` (laid out as ``parts``, one block of rows per
    part, or with ``interleaved`` one row per part for each image in turn), as blocks in the
    order of ``wanted``; ``MERGED`` takes the rows of the part ``kept``. A single block
    is a view."""
    indices = [parts.index(kept if part == MERGED else part) for part in wanted]
    if interleaved:
        per_image = tensor.unflatten(0, (-1, len(parts)))
        picked = [per_image[:, index].contiguous() for index in indices]
    else:
        chunks = tensor.chunk(len(parts))
        picked = [chunks[index] for index in indices]
    return picked[0] if len(picked) == 1 else torch.cat(picked)


def spread_parts(tensor: torch.Tensor, runs: tuple[str, ...], parts: tuple[str, ...]) -> torch.Tensor:
    """A result computed for ``runs`` laid out again as ``parts``: a merged part's rows stand for
    both parts of the text pair."""
    chunks = tensor.chunk(len(runs))
    return torch.cat([chunks[runs.index(MERGED if part in TEXT_PAIR and part not in runs else part)] for part in parts])


def timestep_identity(timestep) -> object | None:
    """What tells two denoiser calls' timesteps apart without reading a device tensor (no
    synchronisation): the memory a tensor timestep views, or a number's value."""
    if isinstance(timestep, torch.Tensor):
        return ("tensor", timestep.device, timestep.untyped_storage().data_ptr(), timestep.storage_offset())
    if isinstance(timestep, (int, float)):
        return ("number", float(timestep))
    return None


class GuidanceTracker:
    """The guidance of the generation running on one pipeline, decided from its denoiser calls.

    ``batched_parts(rows_per_latent)`` is the pipeline family's knowledge of what a batch of that
    many parts holds (``None`` when it does not know); ``reference_kept`` its reference choice;
    ``calls_per_step()`` the denoiser calls one solver step makes without guidance (the
    scheduler's order). A pipeline that does not say whether it guides (Kandinsky 5) and calls
    its denoiser more often than that in a step guides by separate calls, the prompt's first.
    """

    def __init__(self, pipeline: str, batched_parts, reference_kept: str, kept_part: KeptPart, calls_per_step=lambda: 1,
                 guided_now=lambda: None) -> None:
        self.pipeline = pipeline
        self.calls_per_step = calls_per_step
        self.guided_now = guided_now
        """What the pipeline says of its guidance at this moment (a callback may have turned it off)."""
        self.batched_parts = batched_parts
        self.reference_kept = reference_kept
        self.kept_part = kept_part
        self.layout: GuidanceLayout | None = None
        self.latent_batch: int | None = None
        self.says_guided: bool | None = None
        self.told_unguided = False
        self.step = 0
        self._calls_this_step: dict[str, int] = {}
        self._runs_this_step: dict[tuple, int] = {}
        self._timesteps_this_step: list = []
        self._auxiliary_prompt_only = False
        self._decided_in: tuple[int, str] | None = None
        self._replay: dict[tuple[str, int], object] = {}

    # -- the generation ------------------------------------------------------------------

    def begin(self, says_guided: bool | None, told_unguided: bool = False) -> None:
        """``latent_batch`` was set just before, when the pipeline prepared its latents;
        ``told_unguided`` is the user's ``lcm=True`` hint, which the pipeline's calls overrule."""
        self.says_guided = says_guided
        self.told_unguided = told_unguided
        self.layout = None
        self._auxiliary_prompt_only = False
        self.step_started(0)

    def step_started(self, step: int = 0) -> None:
        self.step = step
        self._calls_this_step = {}
        self._runs_this_step = {}
        self._timesteps_this_step = []
        self._replay = {}

    def end(self) -> None:
        self._replay = {}
        self._runs_this_step = {}
        self._timesteps_this_step = []
        self.latent_batch = None

    # -- one denoiser call ---------------------------------------------------------------

    def open_call(self, denoiser: str, main: bool, rows: int, context: str | None, after_gate: bool, timestep=None) -> DenoiserCall:
        """``timestep`` is the call's timestep argument: calls of one denoiser on the same parts
        at the same timestep (:func:`timestep_identity`) within a step are runs over different
        regions, each with caches of its own; calls at other timesteps within a step (a
        second-order solver's, PNDM's first step) share them, the last one's cached."""
        index = self._calls_this_step.get(denoiser, 0)
        self._calls_this_step[denoiser] = index + 1
        parts = self._parts_of(denoiser, main, rows, context, index)
        run = 0
        identity = timestep_identity(timestep)
        if identity is not None:
            run_key = (denoiser, parts, identity)
            run = self._runs_this_step.get(run_key, -1) + 1
            self._runs_this_step[run_key] = run
            self._timesteps_this_step.append(timestep)  # alive, so that no other tensor takes its memory
        layout = self.layout
        undecided = layout is not None and layout.mode is Mode.NONE and main and self.says_guided is None
        if not after_gate or layout is None or not layout.merges:
            return DenoiserCall(denoiser, parts, parts, keep_for_replay=undecided, run=run)
        runs = layout.after_gate(parts)
        if layout.mode is not Mode.SEPARATE or parts[0] not in TEXT_PAIR:
            return DenoiserCall(denoiser, parts, runs, run=run)
        if parts[0] == layout.kept:
            return DenoiserCall(denoiser, parts, runs, keep_for_replay=True, run=run)
        if (denoiser, run) not in self._replay:
            raise GuidanceNotRecognised(
                f"{self.pipeline}: after the gate the {layout.kept} call of a step runs and its result stands for the "
                f"{parts[0]} call, but {denoiser}'s {parts[0]} call came first in this step."
            )
        return DenoiserCall(denoiser, parts, runs, replay=True, run=run)

    def keep_result(self, call: DenoiserCall, output) -> None:
        self._replay[(call.denoiser, call.run)] = output

    def replayed(self, call: DenoiserCall):
        return self._replay[(call.denoiser, call.run)]

    # -- deciding the layout -------------------------------------------------------------

    def _parts_of(self, denoiser: str, main: bool, rows: int, context: str | None, index: int) -> tuple[str, ...]:
        per_latent = self._rows_per_latent(denoiser, rows)
        layout = self.layout
        if layout is None:
            if not main and per_latent == 1:
                # a ControlNet in guess mode runs before the UNet on the prompt's part only
                self._auxiliary_prompt_only = True
                return (PROMPT,)
            layout = self.layout = self._decide(denoiser, per_latent, context)
            self._decided_in = (self.step, denoiser)
            if self.told_unguided and layout.merges:
                warnings.warn(
                    "T-GATE was told `lcm=True` (no classifier-free guidance), but this generation runs classifier-free "
                    "guidance; following the pipeline: the gate averages the prompt and negative-prompt parts and drops "
                    "the guidance after it.",
                    stacklevel=2,
                )
        elif main and layout.mode is Mode.BATCHED and per_latent == 1:
            if index and self.guided_now() is not False:
                # still guided, yet a call on one part follows the guided batch in this step
                raise self._not_recognised(
                    denoiser, rows,
                    f"after call {index} of this step ran on the {len(layout.parts)} parts [{', '.join(layout.parts)}] of its "
                    f"guided batch: an extra denoiser call per step (as self-attention guidance or attend-and-excite make), "
                    f"which belongs to no guidance part T-GATE could merge",
                )
            # a callback switched guidance off mid-run (diffusers' documented dynamic CFG keeps
            # the prompt's half): the prompt's part continues alone
            layout = self.layout = replace(NO_GUIDANCE, kept=layout.kept)
        if layout.mode is Mode.BATCHED:
            if per_latent == len(layout.parts):
                return layout.parts
            if per_latent == 1 and not main:
                return (PROMPT,)
            raise self._not_recognised(denoiser, rows, f"after {len(layout.parts)} parts per latent earlier in this generation")
        if per_latent != 1:
            if layout.mode is not Mode.BATCHED and self._decided_in == (self.step, denoiser) and context is None:
                raise self._not_recognised(
                    denoiser, rows,
                    f"({per_latent} parts per latent) after an earlier call of this step ran on one part per latent: a "
                    f"single-part denoiser call beside the guided batch (as attend-and-excite's gradient step makes), "
                    f"which belongs to no guidance part T-GATE could merge",
                )
            raise self._not_recognised(denoiser, rows, f"after {layout.describe()} earlier in this generation")
        if layout.mode is Mode.NONE and main and self.says_guided is None and index >= self.calls_per_step():
            layout = self.layout = GuidanceLayout(Mode.SEPARATE, (PROMPT, NEGATIVE), PROMPT)
        if layout.mode is Mode.SEPARATE:
            if context in _CONTEXT_PARTS:
                return (_CONTEXT_PARTS[context],)
            return (layout.parts[index % len(layout.parts)],)
        return (PROMPT,)

    def _decide(self, denoiser: str, per_latent: int, context: str | None) -> GuidanceLayout:
        if context in _CONTEXT_PARTS or (per_latent == 1 and self.says_guided):
            first = _CONTEXT_PARTS.get(context, PROMPT)
            parts = (first, NEGATIVE if first == PROMPT else PROMPT)
            kept = first
            if self.kept_part is KeptPart.CONDITIONAL and first != PROMPT:
                raise GuidanceNotRecognised(
                    f"{self.pipeline} calls {denoiser} for the negative prompt before the prompt; after the gate the "
                    f"first call of a step runs, so kept_part='conditional' cannot be honoured: use kept_part='auto'."
                )
            return GuidanceLayout(Mode.SEPARATE, parts, kept)
        if per_latent == 1:
            return NO_GUIDANCE
        parts = self.batched_parts(per_latent)
        if parts is None:
            raise self._not_recognised(
                denoiser, per_latent * (self.latent_batch or 1), f"({per_latent} parts per latent, a layout T-GATE does not know for this pipeline)"
            )
        if self.kept_part is KeptPart.CONDITIONAL or self._auxiliary_prompt_only:
            kept = PROMPT
        else:
            kept = self.reference_kept
        return GuidanceLayout(Mode.BATCHED, parts, kept)

    def _rows_per_latent(self, denoiser: str, rows: int) -> int:
        if self.latent_batch is None:
            raise self._not_recognised(denoiser, rows, "before the pipeline prepared its latents")
        if rows % self.latent_batch:
            raise self._not_recognised(denoiser, rows, "(not a whole number of parts)")
        return rows // self.latent_batch

    def _not_recognised(self, denoiser: str, rows: int, detail: str) -> GuidanceNotRecognised:
        calls = self._calls_this_step.get(denoiser, 1)
        return GuidanceNotRecognised(
            f"T-GATE cannot tell how {self.pipeline} guides its denoiser: in step {self.step}, call {calls} of "
            f"`{denoiser}` ran on {rows} rows for {self.latent_batch} latents {detail}. Supported: no guidance, "
            f"classifier-free guidance in two batch halves or in separate calls per step, PAG and InstructPix2Pix "
            f"batches of three parts. The call was stopped before this denoiser call ran, and this generation's caches are dropped."
        )
