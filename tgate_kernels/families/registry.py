"""The family registry: what differs between the pipelines T-GATE runs on, one entry a family.

A family is a small declarative :class:`Family` record, found by the pipeline's class (or, for a
family defined by its denoiser, the main denoiser's class), matched by class name along the
method resolution order, so a user's subclass of a pipeline belongs to its family and nothing
here imports a pipeline. The engine asks :func:`family_of` and never names a pipeline class;
the entries live beside it, one module per kind (:mod:`.cross_attention`,
:mod:`.joint_attention`). A pipeline of no
entry is an ordinary one: its batched guidance is ``[negative, prompt]`` and the negative part is
kept after the gate, as the reference does.

``conditioning`` says how the prompt reaches the denoiser: through separate cross-attention
layers, or through a text stream that attends together with the image tokens (joint attention),
whose modules T-GATE then caches as it caches cross-attention.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

NEGATIVE = "negative"
PROMPT = "prompt"
PERTURBED = "perturbed"
UNCONDITIONAL = "unconditional"
"""The guidance parts a batch or a call can hold (T-GATE merges the first two after the gate)."""


class Conditioning(enum.Enum):
    """How the prompt reaches a family's denoiser."""

    CROSS_ATTENTION = "cross-attention"
    JOINT_ATTENTION = "joint-attention"


@dataclass(frozen=True)
class Family:
    """What T-GATE needs to know of one pipeline family beyond what it reads from the modules.

    ``batched`` lists the layouts of a guided batch the family builds: what each part holds, in
    batch order, one layout per number of parts; ``kept`` is the part the reference keeps after the gate with
    batched guidance; ``interleaved`` names the denoiser arguments the pipeline lays out one row
    per part for each image in turn rather than one block of rows per part; ``refused`` says why
    T-GATE would read the family's loop or guidance wrongly (then it is refused at ``enable``);
    ``needs`` what settings it must be gated with.
    """

    name: str
    pipelines: tuple[str, ...] = ()
    denoisers: tuple[str, ...] = ()
    conditioning: Conditioning = Conditioning.CROSS_ATTENTION
    batched: tuple[tuple[str, ...], ...] = ((NEGATIVE, PROMPT),)
    kept: str = NEGATIVE
    interleaved: frozenset[str] = frozenset()
    refused: str | None = None
    needs: Callable[[Any], str | None] | None = None
    """For a family T-GATE gates under some settings only: given a ``TgateConfig``, what it lacks
    and what it was given (``None``: nothing lacking)."""


@dataclass(frozen=True)
class SingleStreamBlock:
    """A single-stream joint-attention block class: one set of layers over the text and image
    rows of one sequence, found by ``block`` (its class name, matched along the MRO).

    ``text_argument`` is the forward argument that brings its text rows; ``text_first`` says
    whether they come before the image rows in the block's sequence, ``returns_text_first``
    whether the text output comes first in the pair the block returns. A block with no
    ``text_argument`` takes one joined sequence as ``image_argument``, the text rows first, as
    many as the dual-stream blocks before it in the same call had, and returns it joined.
    ``attention`` is the block's attention attribute and ``projections`` that attention's
    projections of the joint sequence (each a ``Linear`` whose rows follow the sequence's).

    A block that cannot run without its text rows (it cuts its sequence by their count from the
    end, or puts RoPE after them by their count: HunyuanVideo's, CogVideoX's) names in
    ``row_modules`` its other modules that work row by row on the joint sequence (their dotted
    paths in the block). After the gate it runs with its text rows in place, but each of those
    modules and each projection computes the image rows alone; the text rows a projection gives
    are the ones it gave at the gate, the others' zeros, which reach nothing but the block's text
    output (replaced by the gate step's). Only the attention's text query rows are still computed.

    A block taking one joined sequence with no dual-stream block before it to count the text rows
    (Lumina 2's) says where its denoiser reads each sample's text mask: ``text_mask`` names the
    denoiser's submodule and that module's argument (a boolean or 0/1 mask, one row a sample).
    Each sample's text rows are its mask's count, its image rows follow them, and a sample whose
    text is shorter than the longest is padded after its image rows. ``under`` names the
    denoiser's attribute holding the blocks, where the same class also builds blocks of another
    role (Lumina 2's refiners of the text alone and of the image alone).
    """

    block: str
    text_argument: str | None = "encoder_hidden_states"
    image_argument: str = "hidden_states"
    text_first: bool = True
    returns_text_first: bool = True
    attention: str = "attn"
    projections: tuple[str, ...] = ("to_q", "to_k", "to_v")
    row_modules: tuple[str, ...] = ()
    text_mask: tuple[str, str] | None = None
    under: str | None = None

    @property
    def keeps_text_rows(self) -> bool:
        """Whether the block runs after the gate with its text rows in place (see ``row_modules``)."""
        return bool(self.row_modules)


ORDINARY = Family("cross-attention")
"""A pipeline of no entry: CFG in ``[negative, prompt]`` halves, the negative part kept."""

PERTURBED_ATTENTION_LAYOUTS = ((NEGATIVE, PROMPT, PERTURBED), (PROMPT, PERTURBED))
"""Perturbed-attention guidance (PAG) adds its part after the others, in every family."""

_BY_PIPELINE: dict[str, Family] = {}
_BY_DENOISER: dict[str, Family] = {}
_SINGLE_STREAM: dict[str, SingleStreamBlock] = {}


def register(family: Family) -> Family:
    """Add ``family``; a class name already taken by another family is an error."""
    for names, table in ((family.pipelines, _BY_PIPELINE), (family.denoisers, _BY_DENOISER)):
        for name in names:
            if name in table and table[name] is not family:
                raise ValueError(f"{name} already belongs to the {table[name].name!r} family.")
            table[name] = family
    return family


def register_single_stream(layout: SingleStreamBlock) -> SingleStreamBlock:
    """Add a single-stream block class T-GATE freezes the text rows of."""
    _SINGLE_STREAM[layout.block] = layout
    return layout


def single_stream_layout(module, name: str | None = None) -> SingleStreamBlock | None:
    """How ``module`` (``name``: its dotted path in its denoiser) lays out its text rows, if it is
    a registered single-stream block there."""
    _registered()
    layout = next((_SINGLE_STREAM[c] for c in _class_names(module) if c in _SINGLE_STREAM), None)
    if layout is not None and layout.under is not None and (name is None or name.split(".")[0] != layout.under):
        return None
    return layout


def _class_names(obj) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _registered() -> None:
    from . import cross_attention, joint_attention  # noqa: F401  (they register their families on first use)


def family_of(pipe, main_denoiser=None) -> Family:
    """The family of ``pipe``: by its class, else by its main denoiser's, else :data:`ORDINARY`."""
    _registered()
    for name in _class_names(pipe):
        if name in _BY_PIPELINE:
            return _BY_PIPELINE[name]
    if main_denoiser is not None:
        for name in _class_names(main_denoiser):
            if name in _BY_DENOISER:
                return _BY_DENOISER[name]
    return ORDINARY


def registered_families() -> list[Family]:
    """Every registered family, in registration order."""
    _registered()
    seen: dict[str, Family] = {}
    for family in [*_BY_PIPELINE.values(), *_BY_DENOISER.values()]:
        seen.setdefault(family.name, family)
    return list(seen.values())


def family_of_pipeline(name: str) -> Family:
    """The family of the pipeline class named ``name`` (for tools that name a pipeline without
    building one)."""
    _registered()
    return _BY_PIPELINE.get(name, ORDINARY)


def uses_perturbed_attention(pipe) -> bool:
    """Whether ``pipe`` is a PAG pipeline (diffusers' PAG pipelines all mix in ``PAGMixin``)."""
    return "PAGMixin" in _class_names(pipe)


def batched_parts(pipe, family: Family, parts_per_latent: int) -> tuple[str, ...] | None:
    """What each part of a guided batch of ``parts_per_latent`` parts holds, in batch order
    (``None``: a layout the family does not know)."""
    perturbed = uses_perturbed_attention(pipe) and _says(pipe, "do_perturbed_attention_guidance")
    layouts = PERTURBED_ATTENTION_LAYOUTS if perturbed else family.batched
    return next((parts for parts in layouts if len(parts) == parts_per_latent), None)


def _says(pipe, name: str) -> bool | None:
    """A flag the pipeline says of its running call (a property), ``None`` when it has none."""
    if not isinstance(getattr(type(pipe), name, None), property):
        return None
    try:
        return bool(getattr(pipe, name))
    except (AttributeError, TypeError, RuntimeError):
        return None


def says_guided(pipe) -> bool | None:
    """Whether the running generation uses classifier-free guidance, as the pipeline says;
    ``None`` when the pipeline does not say."""
    return _says(pipe, "do_classifier_free_guidance")
