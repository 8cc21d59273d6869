"""The micro world: a deterministic captioned generator, its classifier and the shipped pipelines.

The bounds below are what the shipped weights (``tgate_kernels/tools/micro/weights``) measured, minus a
margin for other CPUs and library versions; the measured values are in the comments.
"""

import numpy as np
import pytest
import torch

import tgate_kernels
from tgate_kernels.tools.micro import world
from tgate_kernels.tools.micro.adherence import (
    FOLDER,
    MICRO_CALL,
    WITHOUT,
    WEIGHTS,
    AttributeClassifier,
    adherence,
    attribute_adherence,
    classify,
    load_classifier,
    load_micro_pipeline,
    micro_call,
)
from tgate_kernels.tools.micro.world import EVAL_PROMPTS, Attributes, Thing, caption, dataset, parse_caption, render

# Disjoint from the streams the models were trained on (see train._stream).
HELD_OUT_SEED = 20240613


def test_dataset_is_deterministic_given_its_seed():
    images, captions, scenes = dataset(64, seed=3)
    again_images, again_captions, again_scenes = dataset(64, seed=3)
    assert images.dtype == np.uint8 and images.shape == (64, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    np.testing.assert_array_equal(images, again_images)
    assert captions == again_captions and scenes == again_scenes
    other_images, other_captions, _ = dataset(64, seed=4)
    assert not np.array_equal(images, other_images)
    assert captions != other_captions
    np.testing.assert_array_equal(render(scenes[0]), images[0])


def test_captions_describe_their_scenes():
    _, captions, scenes = dataset(500, seed=5)
    for text, scene in zip(captions, scenes):
        assert text == caption(scene)
        assert parse_caption(text) == scene.attributes
    # Both kinds of scene and every attribute value occur.
    things = [thing for scene in scenes for thing in scene.attributes.things]
    assert {len(scene.attributes.things) for scene in scenes} == {1, 2}
    assert {t.shape for t in things} == set(world.SHAPES)
    assert {t.colour for t in things} == set(world.COLOURS)
    assert {scene.attributes.where for scene in scenes} == {*world.POSITIONS, *world.RELATIONS}


def test_parse_caption_inverts_caption_and_rejects_other_text():
    pair = Attributes((Thing("square", "blue"), Thing("triangle", "yellow")), "above")
    assert caption(pair) == "a blue square above a yellow triangle"
    assert parse_caption("  A blue square ABOVE a yellow   triangle ") == pair
    lone = parse_caption("a small red circle on the left")
    assert lone == Attributes((Thing("circle", "red", "small"),), "left")
    for text in ("a red circle on the left", "a small red circle left of a blue square", "a purple circle at the top", "a photo of a cat"):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_eval_prompts_cover_the_attribute_space():
    asked = [parse_caption(prompt) for prompt in EVAL_PROMPTS]
    assert [caption(a) for a in asked] == list(EVAL_PROMPTS)
    lone = [a for a in asked if len(a.things) == 1]
    pairs = [a for a in asked if len(a.things) == 2]
    assert len(lone) == len(pairs) == 24
    assert {(a.things[0].shape, a.things[0].colour, a.things[0].size) for a in lone} == {
        (s, c, z) for s in world.SHAPES for c in world.COLOURS for z in world.SIZES
    }
    assert {a.where for a in lone} == set(world.POSITIONS) and {a.where for a in pairs} == set(world.RELATIONS)
    assert {t for a in pairs for t in a.things} == {Thing(s, c) for s in world.SHAPES for c in world.COLOURS}


def test_classifier_reads_held_out_scenes():
    images, _, scenes = dataset(2000, seed=HELD_OUT_SEED)
    read = classify(images)
    accuracy = np.mean([r == s.attributes for r, s in zip(read, scenes)])
    # Measured: 1.000 of whole scenes right (per attribute see weights/classifier/README.md).
    assert accuracy >= 0.97
    # Float images in [0, 1] (a pipeline's output_type="np") read the same as uint8 ones.
    assert classify(images[:64].astype(np.float32) / 255) == read[:64]
    assert isinstance(load_classifier(), AttributeClassifier)


def test_adherence_counts_prompts_whose_image_shows_everything_asked():
    _, _, scenes = dataset(8, seed=HELD_OUT_SEED)
    images = np.stack([render(scene) for scene in scenes])
    prompts = [caption(scene) for scene in scenes]
    assert adherence(prompts, images) == 1.0 and attribute_adherence(prompts, images) == 1.0
    # Each image paired with another scene's caption: at most chance agreement.
    assert adherence(prompts[1:] + prompts[:1], images) <= 0.25
    # another scene's caption still shares some attributes: partial credit lies strictly between
    assert 0.0 < attribute_adherence(prompts[1:] + prompts[:1], images) < 1.0
    with pytest.raises(ValueError):
        adherence(prompts[:3], images)


def _generate(pipe, name, prompts, steps=None, seed=0):
    call = micro_call(name, len(prompts))
    if steps is not None:
        call["num_inference_steps"] = steps
    return pipe(list(prompts), generator=torch.Generator().manual_seed(seed), output_type="np", **call).images


def test_micro_sd_follows_prompts():
    pipe = load_micro_pipeline("sd")
    prompts = EVAL_PROMPTS[::4]
    images = _generate(pipe, "sd", prompts)
    # Measured: 12 of these 12 prompts (100% over all 48 EVAL_PROMPTS with 4 seeds, bench/QUALITY.md).
    assert adherence(prompts, images) >= 0.75


@pytest.mark.parametrize("name", ["sd", "pixart", "sd3", "flux", "flux-no-cfg"])
def test_shipped_pipelines_load_and_run_gated(name):
    from diffusers import DiffusionPipeline, FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(WEIGHTS / FOLDER.get(name, name), **WITHOUT.get(name, {}))
    expected = {"sd": StableDiffusionPipeline, "pixart": PixArtAlphaPipeline, "sd3": StableDiffusion3Pipeline,
                "flux": FluxPipeline, "flux-no-cfg": FluxPipeline}[name]
    assert isinstance(pipe, expected)
    assert all(p.dtype == torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    pipe.set_progress_bar_config(disable=True)
    prompts = EVAL_PROMPTS[1::12]
    ungated = _generate(pipe, name, prompts, steps=10)
    tgate_kernels.enable(pipe, gate_step=0.4)
    gated = _generate(pipe, name, prompts, steps=10)
    tgate_kernels.disable(pipe)
    assert gated.shape == ungated.shape == (len(prompts), world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert np.isfinite(gated).all()
    assert np.abs(gated - ungated).max() > 1e-3
    np.testing.assert_array_equal(_generate(pipe, name, prompts, steps=10), ungated)


@pytest.mark.parametrize("name", ["sd", "pixart", "sd3", "flux"])
def test_cross_attention_settles_during_a_micro_generation(name):
    """T-GATE's premise, observable in the micro world: the step-to-step change of the
    cross-attention outputs (micro SD3: of its text stream) falls as sampling goes on
    (bench/micro/CONVERGENCE.md plots it)."""
    pipe = load_micro_pipeline(name)
    # a threshold nothing reaches and the widest window: the chooser records every step's change
    tgate_kernels.enable(pipe, gate_step="auto", auto_gate={"threshold": 1e-9, "max_fraction": 0.95})
    _generate(pipe, name, EVAL_PROMPTS[::6])
    changes = np.array(tgate_kernels.view(pipe).last_generation.cross_attention_changes)
    assert len(changes) == MICRO_CALL[name]["num_inference_steps"] - 2
    early, late = changes[:3].mean(), changes[-4:].mean()
    # Measured (slowest sample of the batch): sd 0.126 -> 0.047 (0.37x), pixart 0.036 -> 0.018 (0.50x),
    # sd3's text stream 0.568 -> 0.093 (0.16x), flux's (its prompt's calls) 0.216 -> 0.034 (0.16x).
    assert late < 0.65 * early
