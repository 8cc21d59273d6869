"""A deterministic synthetic world of captioned 32x32 images: one or two coloured shapes.

A scene holds one object placed against an edge of the image ("a small red circle on the left")
or two objects side by side or one above the other ("a blue square above a yellow triangle").
Every object has a shape and a colour; a lone object also has a size, while the two objects of a
pair share one fixed, uncaptioned size so that both fit.  Captions come from a small grammar that
:func:`parse_caption` inverts, so a prompt says exactly which attributes an image must show.

Images are rendered with 4x4 supersampling (antialiased edges) on a plain dark background; the
only randomness is in :func:`sample_scene`, which draws the attributes and a little jitter of
position and scale from a ``numpy`` generator, so :func:`dataset` is a pure function of its seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "EVAL_PROMPTS",
    "IMAGE_SIZE",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Attributes",
    "Scene",
    "Thing",
    "caption",
    "dataset",
    "parse_caption",
    "render",
    "sample_scene",
]

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Saturated colours far apart in RGB, so that a blurry or slightly off generation still reads
#: unambiguously as one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
}
SIZES: tuple[str, ...] = ("small", "large")
#: Where a lone object sits; the phrase each position takes in a caption.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
#: How the first object of a pair relates to the second.
RELATIONS: tuple[str, ...] = ("left of", "above")
BACKGROUND: tuple[int, int, int] = (24, 24, 24)

# Radius of the circle with the same area as the object, in pixels; objects of a pair use the
# middle one, which leaves a clear gap between two objects on a 32-pixel canvas.
_SCALE = {"small": 3.5, "large": 7.5, None: 5.0}
_SCALE_JITTER = 0.1
# Distance of an object's bounding box from the image border it is placed against.
_MARGIN = (1.0, 3.0)
# Largest offset from the middle of the image along the axis an object is not placed against.
_CENTRE_JITTER = 3.0
_SUPERSAMPLING = 4


@dataclass(frozen=True)
class Thing:
    """One object: ``size`` is ``None`` for the objects of a pair, whose size is not captioned."""

    shape: str
    colour: str
    size: str | None = None


@dataclass(frozen=True)
class Attributes:
    """What a caption says about a scene (or what the classifier reads in an image).

    ``where`` is a key of :data:`POSITIONS` for one object, or one of :data:`RELATIONS` for two
    (the first object is left of / above the second).  :func:`sample_scene` never draws two
    identical objects, but a generated image may show them, so they are allowed here.
    """

    things: tuple[Thing, ...]
    where: str

    def __post_init__(self) -> None:
        for thing in self.things:
            if thing.shape not in SHAPES or thing.colour not in COLOURS:
                raise ValueError(f"Unknown shape or colour in {thing}")
        if len(self.things) == 1:
            if self.things[0].size not in SIZES or self.where not in POSITIONS:
                raise ValueError(f"A lone object needs a size and a position: {self}")
        elif len(self.things) == 2:
            if any(t.size is not None for t in self.things) or self.where not in RELATIONS:
                raise ValueError(f"A pair needs a relation and no sizes: {self}")
        else:
            raise ValueError(f"A scene has one or two objects: {self}")


@dataclass(frozen=True)
class Scene:
    """A renderable scene: its attributes, plus where exactly each object is and how big.

    ``centres`` are the objects' centroids (x, y) in pixels from the top-left corner; ``radii``
    the radius of the circle with each object's area.
    """

    attributes: Attributes
    centres: tuple[tuple[float, float], ...]
    radii: tuple[float, ...]


def _extent(shape: str, radius: float) -> tuple[float, float, float]:
    """Half-width and extents above and below the centroid of a shape with the area of a circle
    of ``radius``."""
    if shape == "circle":
        return radius, radius, radius
    if shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        return half, half, half
    circumradius = _triangle_circumradius(radius)
    return circumradius * math.sqrt(3) / 2, circumradius, circumradius / 2


def _triangle_circumradius(radius: float) -> float:
    # An upward equilateral triangle with area pi * radius^2.
    return radius * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))


def _sample_thing(rng: np.random.Generator, sized: bool) -> Thing:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))] if sized else None
    return Thing(shape, colour, size)


def _centroid_y(shape: str, radius: float, box_centre_y: float) -> float:
    _, up, down = _extent(shape, radius)
    return box_centre_y - (down - up) / 2


def _against_edge(rng: np.random.Generator, half: float, far: bool) -> float:
    """Centre coordinate of a bounding box of half-length ``half`` near the near or far border."""
    offset = rng.uniform(*_MARGIN) + half
    return IMAGE_SIZE - offset if far else offset


def _across(rng: np.random.Generator) -> float:
    return IMAGE_SIZE / 2 + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)


def _place(rng: np.random.Generator, thing: Thing, radius: float, edge: str) -> tuple[float, float]:
    """Centroid of ``thing`` with its bounding box against ``edge`` of the image."""
    half_width, up, down = _extent(thing.shape, radius)
    half_height = (up + down) / 2
    if edge in ("left", "right"):
        x = _against_edge(rng, half_width, far=edge == "right")
        y = _across(rng)
    else:
        x = _across(rng)
        y = _against_edge(rng, half_height, far=edge == "bottom")
    return x, _centroid_y(thing.shape, radius, y)


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: one object (2 in 5) or a pair (3 in 5, as pairs have more combinations)."""
    if rng.random() < 0.4:
        thing = _sample_thing(rng, sized=True)
        position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
        attributes = Attributes((thing,), position)
        edges = (position,)
    else:
        first = _sample_thing(rng, sized=False)
        second = first
        while second == first:
            second = _sample_thing(rng, sized=False)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        attributes = Attributes((first, second), relation)
        edges = ("left", "right") if relation == "left of" else ("top", "bottom")
    radii = tuple(
        _SCALE[thing.size] * (1 + rng.uniform(-_SCALE_JITTER, _SCALE_JITTER))
        for thing in attributes.things
    )
    centres = tuple(
        _place(rng, thing, radius, edge)
        for thing, radius, edge in zip(attributes.things, radii, edges)
    )
    return Scene(attributes, centres, radii)


def _coverage(shape: str, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a regular grid of sub-pixel samples."""
    samples = (np.arange(IMAGE_SIZE * _SUPERSAMPLING) + 0.5) / _SUPERSAMPLING
    x = samples[None, :] - centre[0]
    y = samples[:, None] - centre[1]
    if shape == "circle":
        inside = x**2 + y**2 <= radius**2
    elif shape == "square":
        half = _extent(shape, radius)[0]
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    else:
        circumradius = _triangle_circumradius(radius)
        # Below the apex's two sides and above the base (y grows downwards).
        slope = math.sqrt(3)
        inside = (y <= circumradius / 2) & (y >= slope * np.abs(x) - circumradius)
    blocks = inside.reshape(IMAGE_SIZE, _SUPERSAMPLING, IMAGE_SIZE, _SUPERSAMPLING)
    return blocks.mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``uint8`` array of shape (32, 32, 3)."""
    image = np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float64), (IMAGE_SIZE, IMAGE_SIZE, 3))
    for thing, centre, radius in zip(scene.attributes.things, scene.centres, scene.radii):
        alpha = _coverage(thing.shape, centre, radius)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[thing.colour], dtype=np.float64) * alpha
    return np.rint(image).astype(np.uint8)


def caption(scene: Scene | Attributes) -> str:
    """The caption of a scene (or of its attributes), e.g. ``"a small red circle on the left"``."""
    attributes = scene.attributes if isinstance(scene, Scene) else scene
    if len(attributes.things) == 1:
        thing = attributes.things[0]
        return f"a {thing.size} {thing.colour} {thing.shape} {POSITIONS[attributes.where]}"
    first, second = attributes.things
    return f"a {first.colour} {first.shape} {attributes.where} a {second.colour} {second.shape}"


def _alternatives(words: tuple[str, ...] | dict[str, str]) -> str:
    return "|".join(re.escape(word) for word in words)


_THING = rf"a (?:(?P<{{p}}size>{_alternatives(SIZES)}) )?(?P<{{p}}colour>{_alternatives(COLOURS)}) (?P<{{p}}shape>{_alternatives(SHAPES)})"
_ONE = re.compile(
    _THING.format(p="a_") + rf" (?P<where>{_alternatives(tuple(POSITIONS.values()))})"
)
_TWO = re.compile(
    _THING.format(p="a_")
    + rf" (?P<relation>{_alternatives(RELATIONS)}) "
    + _THING.format(p="b_")
)


def parse_caption(text: str) -> Attributes:
    """The attributes a caption of :func:`caption`'s grammar asks for; ``ValueError`` otherwise.

    Case and surrounding or repeated whitespace are ignored.
    """
    normalised = " ".join(text.lower().split())
    if match := _ONE.fullmatch(normalised):
        position = {phrase: key for key, phrase in POSITIONS.items()}[match["where"]]
        thing = Thing(match["a_shape"], match["a_colour"], match["a_size"])
        return Attributes((thing,), position)
    if (match := _TWO.fullmatch(normalised)) and not (match["a_size"] or match["b_size"]):
        things = tuple(Thing(match[f"{p}_shape"], match[f"{p}_colour"]) for p in "ab")
        return Attributes(things, match["relation"])
    raise ValueError(f"Not a caption of the micro world: {text!r}")


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` scenes drawn with ``numpy.random.default_rng(seed)``: images (n, 32, 32, 3) uint8,
    captions and scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(scene) for scene in scenes]) if scenes else np.zeros(
        (0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )
    return images, [caption(scene) for scene in scenes], scenes


#: Evaluation prompts: 24 lone objects (every shape-colour pair once small and once large, each
#: position 6 times) and 24 pairs (every shape-colour combination once as first and twice as
#: second object, beside one of the same colour or one of the same shape; each relation 12 times).
EVAL_PROMPTS: tuple[str, ...] = (
    "a small red circle on the left",
    "a small red square on the right",
    "a small red triangle at the top",
    "a small green circle at the bottom",
    "a small green square on the left",
    "a small green triangle on the right",
    "a small blue circle at the top",
    "a small blue square at the bottom",
    "a small blue triangle on the left",
    "a small yellow circle on the right",
    "a small yellow square at the top",
    "a small yellow triangle at the bottom",
    "a large red circle at the top",
    "a large red square at the bottom",
    "a large red triangle on the left",
    "a large green circle on the right",
    "a large green square at the top",
    "a large green triangle at the bottom",
    "a large blue circle on the left",
    "a large blue square on the right",
    "a large blue triangle at the top",
    "a large yellow circle at the bottom",
    "a large yellow square on the left",
    "a large yellow triangle on the right",
    "a red circle left of a red square",
    "a red square above a red triangle",
    "a red triangle left of a green circle",
    "a green circle above a green square",
    "a green square left of a green triangle",
    "a green triangle above a blue circle",
    "a blue circle left of a blue square",
    "a blue square above a blue triangle",
    "a blue triangle left of a yellow circle",
    "a yellow circle above a yellow square",
    "a yellow square left of a yellow triangle",
    "a yellow triangle above a red circle",
    "a red circle left of a blue circle",
    "a red square above a blue square",
    "a red triangle left of a blue triangle",
    "a green circle above a yellow circle",
    "a green square left of a yellow square",
    "a green triangle above a yellow triangle",
    "a blue circle left of a red circle",
    "a blue square above a red square",
    "a blue triangle left of a red triangle",
    "a yellow circle above a green circle",
    "a yellow square left of a green square",
    "a yellow triangle above a green triangle",
)
