"""Prompt adherence in the micro world: the shipped pipelines, and a classifier that reads images.

:func:`classify` reads the shapes, colours, sizes and layout of the objects in 32x32 images with
the small CNN trained by :mod:`tgate_kernels.tools.micro.train` on rendered scenes, and
:func:`adherence` is the fraction of (prompt, image) pairs whose image shows everything the
prompt asks for.  The grammar of the micro world's captions always names every attribute the
classifier reads, so "everything asked for" is equality of :class:`~.world.Attributes`.

:func:`load_micro_pipeline` loads the shipped Stable Diffusion or PixArt pipeline, and
:data:`MICRO_CALL` holds the call arguments they were evaluated with, e.g.::

    pipe = load_micro_pipeline("pixart")
    images = pipe(prompts, generator=generator, output_type="np", **MICRO_CALL["pixart"]).images
    score = adherence(prompts, images)
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .world import COLOURS, IMAGE_SIZE, POSITIONS, RELATIONS, SHAPES, SIZES, Attributes, Thing, parse_caption

__all__ = [
    "MICRO_CALL",
    "WEIGHTS",
    "WITHOUT",
    "FOLDER",
    "IGNORE",
    "AttributeClassifier",
    "adherence",
    "adherence_scores",
    "attribute_adherence",
    "as_model_input",
    "classify",
    "load_classifier",
    "load_micro_pipeline",
    "micro_call",
    "save_classifier",
]

#: The shipped models: ``sd``, ``pixart``, ``sd3``, ``flux`` (diffusers pipeline folders) and ``classifier``.
WEIGHTS = Path(__file__).with_name("weights")

#: Call arguments of the shipped pipelines besides prompts, ``generator`` and ``output_type``.
#: The PixArt pipeline only knows aspect-ratio bins for 256-1024 px models, so binning must be
#: off to generate the 32x32 images it was trained on; caption cleaning would need optional
#: packages (bs4, ftfy) and only warns without them; its T5 encoder was trained on 16 tokens
#: (captions are at most 9), and padding is masked, so longer sequences would only cost time.
MICRO_CALL: dict[str, dict[str, Any]] = {
    "sd": {"num_inference_steps": 20, "guidance_scale": 4.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "pixart": {
        "num_inference_steps": 20,
        "guidance_scale": 4.0,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "use_resolution_binning": False,
        "clean_caption": False,
        "max_sequence_length": 16,
    },
    "sd3": {"num_inference_steps": 20, "guidance_scale": 4.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE},
    # true CFG: a second call a step on the empty prompt (what the 10% dropped captions trained)
    "flux": {
        "num_inference_steps": 20, "true_cfg_scale": 4.0, "negative_prompt": "", "height": IMAGE_SIZE,
        "width": IMAGE_SIZE, "max_sequence_length": 16,
    },
    # the same weights without guidance: one call a step, only the frozen text stream saves
    "flux-no-cfg": {"num_inference_steps": 20, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "max_sequence_length": 16},
}


def micro_call(name: str, prompts: int) -> dict[str, Any]:
    """:data:`MICRO_CALL` ``[name]`` for a call of ``prompts`` prompts: a lone negative prompt
    repeated for each (true-CFG pipelines encode a lone one for a single image)."""
    call = dict(MICRO_CALL[name])
    if isinstance(call.get("negative_prompt"), str):
        call["negative_prompt"] = [call["negative_prompt"]] * prompts
    return call


#: The weights folder of each entry of :data:`MICRO_CALL` that does not have its own.
FOLDER: dict[str, str] = {"flux-no-cfg": "flux"}

#: Components a shipped pipeline was saved without, which ``from_pretrained`` must be told of:
#: micro SD3 has no T5 encoder (its pipeline feeds zeros in its place).
WITHOUT: dict[str, dict[str, None]] = {"sd3": {"text_encoder_3": None, "tokenizer_3": None}}

# Where the objects are: a lone object's position, or the relation of the two objects of a pair.
_LAYOUTS: tuple[str, ...] = (*POSITIONS, *RELATIONS)
_HEADS: dict[str, tuple[str, ...]] = {
    "layout": _LAYOUTS,
    "size": SIZES,
    "shape_1": SHAPES,
    "colour_1": tuple(COLOURS),
    "shape_2": SHAPES,
    "colour_2": tuple(COLOURS),
}
# Targets of heads that do not apply to a scene (a lone object has no second object, and the
# objects of a pair no size); cross-entropy skips them.
IGNORE = -100


class AttributeClassifier(nn.Module):
    """A small CNN with one classification head per attribute (:attr:`HEADS`: name -> labels).

    The convolutions keep the spatial layout down to 4x4 and a dense layer reads it, since where
    the objects are is one of the attributes.  Inputs are (N, 3, 32, 32) images scaled to [-1, 1].
    """

    HEADS = _HEADS

    def __init__(self, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "hidden": hidden}
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * width * (IMAGE_SIZE // 8) ** 2, hidden),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(labels)) for name, labels in _HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @staticmethod
    def targets(attributes: Attributes) -> dict[str, int]:
        """Class index per head for a scene's attributes (:data:`IGNORE` where a head does not apply)."""
        first = attributes.things[0]
        second = attributes.things[1] if len(attributes.things) == 2 else None
        return {
            "layout": _LAYOUTS.index(attributes.where),
            "size": SIZES.index(first.size) if first.size is not None else IGNORE,
            "shape_1": SHAPES.index(first.shape),
            "colour_1": tuple(COLOURS).index(first.colour),
            "shape_2": SHAPES.index(second.shape) if second else IGNORE,
            "colour_2": tuple(COLOURS).index(second.colour) if second else IGNORE,
        }

    @staticmethod
    def decode(classes: dict[str, int]) -> Attributes:
        """The attributes that one class index per head describes."""
        label = {name: _HEADS[name][index] for name, index in classes.items()}
        if label["layout"] in POSITIONS:
            thing = Thing(label["shape_1"], label["colour_1"], label["size"])
            return Attributes((thing,), label["layout"])
        things = (Thing(label["shape_1"], label["colour_1"]), Thing(label["shape_2"], label["colour_2"]))
        return Attributes(things, label["layout"])


def save_classifier(model: AttributeClassifier, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**model.config, "heads": {name: list(labels) for name, labels in _HEADS.items()}}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


@functools.lru_cache(maxsize=4)
def load_classifier(folder: str | Path | None = None) -> AttributeClassifier:
    """The attribute classifier saved in ``folder`` (default: the shipped one), in eval mode.

    Cached per folder, so do not modify the returned model.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else WEIGHTS / "classifier"
    config = json.loads((folder / "config.json").read_text())
    if config["heads"] != {name: list(labels) for name, labels in _HEADS.items()}:
        raise ValueError(f"{folder} holds a classifier for other attributes than this world's")
    model = AttributeClassifier(width=config["width"], hidden=config["hidden"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def as_model_input(images: np.ndarray | Sequence[Any]) -> torch.Tensor:
    """Images as a float32 (N, 3, 32, 32) tensor in [-1, 1].

    Accepts an (N, 32, 32, 3) array, ``uint8`` or float in [0, 1] (a pipeline's ``output_type="np"``),
    or a sequence of PIL images.
    """
    array = images if isinstance(images, np.ndarray) else np.stack([np.asarray(image) for image in images])
    if array.ndim != 4 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"Expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images, got shape {array.shape}")
    scaled = array.astype(np.float32) / 255 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(scaled).permute(0, 3, 1, 2) * 2 - 1


@torch.no_grad()
def classify(images: np.ndarray | Sequence[Any], classifier: AttributeClassifier | None = None) -> list[Attributes]:
    """What the classifier (default: the shipped one) reads in each image."""
    model = classifier if classifier is not None else load_classifier()
    logits = model(as_model_input(images))
    indices = {name: values.argmax(dim=1).tolist() for name, values in logits.items()}
    return [model.decode({name: column[i] for name, column in indices.items()}) for i in range(len(images))]


def _facts(attributes: Attributes) -> set[tuple]:
    facts = {("where", attributes.where)}
    for index, thing in enumerate(attributes.things):
        facts |= {(index, "shape", thing.shape), (index, "colour", thing.colour)}
        if thing.size is not None:
            facts.add((index, "size", thing.size))
    return facts


def adherence_scores(
    prompts: Sequence[str], images: np.ndarray | Sequence[Any], classifier: AttributeClassifier | None = None
) -> tuple[float, float]:
    """:func:`adherence` and :func:`attribute_adherence` from one reading of the images."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if not prompts:
        raise ValueError("adherence of no images")
    pairs = list(zip((parse_caption(prompt) for prompt in prompts), classify(images, classifier)))
    whole = sum(asked == seen for asked, seen in pairs) / len(pairs)
    partial = float(np.mean([len(_facts(asked) & _facts(seen)) / len(_facts(asked)) for asked, seen in pairs]))
    return whole, partial


def adherence(
    prompts: Sequence[str], images: np.ndarray | Sequence[Any], classifier: AttributeClassifier | None = None
) -> float:
    """Fraction of (prompt, image) pairs whose image shows every attribute the prompt asks for.

    Prompts must follow the micro world's caption grammar (see :func:`~.world.parse_caption`).
    """
    return adherence_scores(prompts, images, classifier)[0]


def attribute_adherence(
    prompts: Sequence[str], images: np.ndarray | Sequence[Any], classifier: AttributeClassifier | None = None
) -> float:
    """Mean over (prompt, image) pairs of the fraction of the prompt's attributes (each object's
    shape, colour and size, and the position or relation) that the image shows: partial credit
    where :func:`adherence` counts whole scenes."""
    return adherence_scores(prompts, images, classifier)[1]


def load_micro_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped micro pipeline ``"sd"`` (StableDiffusionPipeline), ``"pixart"``
    (PixArtAlphaPipeline), ``"sd3"`` (StableDiffusion3Pipeline) or ``"flux"`` / ``"flux-no-cfg"``
    (FluxPipeline) on ``device`` in ``dtype``, progress bar disabled.

    Call it with :data:`MICRO_CALL` ``[name]``.
    """
    from diffusers import DiffusionPipeline

    if name not in MICRO_CALL:
        raise ValueError(f"Unknown micro pipeline {name!r}; expected one of: {', '.join(MICRO_CALL)}")
    pipe = DiffusionPipeline.from_pretrained(WEIGHTS / FOLDER.get(name, name), dtype=dtype, **WITHOUT.get(name, {})).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
