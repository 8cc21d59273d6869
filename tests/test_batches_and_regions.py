"""Rows and runs T-GATE must keep apart: several prompts and images in one batch, conditioning
a pipeline lays out one row per part for each image in turn, a denoiser run once per region
within a step (MultiDiffusion), a module run several times within one denoiser call, and a
denoiser call that belongs to no guidance part."""

import inspect

import pytest
import torch

import tgate_kernels
from fixtures.families import FAMILIES
from fixtures.tiny_pipelines import tiny_sd, tiny_sdxl

from conftest import first_changed_step, max_abs_diff

SCHEDULE = dict(gate_step=2, sp_interval=2, warm_up=0)
PROMPTS = ["a tiny red fox", "a blue house by the sea"]
NEGATIVES = ["blurry, low quality", "dark"]


def _per_prompt_argument(pipe) -> str | None:
    parameters = inspect.signature(type(pipe).__call__).parameters
    for name in ("num_images_per_prompt", "num_videos_per_prompt", "num_waveforms_per_prompt"):
        if name in parameters:
            return name
    return None


BATCHED = [
    name for name, family in FAMILIES.items()
    if not family.refused and "batched" in family.guidance and "image embedding" not in family.guidance
]


@pytest.mark.slow
@pytest.mark.parametrize("name", BATCHED)
def test_every_image_of_a_gated_batch_is_the_image_its_prompt_makes_alone(name):
    """Two prompts, two images each: each image is the one T-GATE makes for its prompt alone
    from the same noise, so no conditioning input was cut to another image's or part's rows."""
    family = FAMILIES[name]
    per_prompt = _per_prompt_argument(family.build())
    if per_prompt is None:
        pytest.fail(f"{family.pipeline_class} has no images-per-prompt argument")
    seeds = [11, 12, 13, 14]

    def batch(pipe):
        call = _four_images(family.call_kwargs(4), per_prompt, None)
        call["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
        return _frames(pipe(**call))

    def alone(pipe, image):
        call = _four_images(family.call_kwargs(4), per_prompt, image)
        call["generator"] = [torch.Generator().manual_seed(seeds[image])]
        return _frames(pipe(**call))[0]

    plain = family.build()
    gated = tgate_kernels.enable(family.build(), kernels="off", **SCHEDULE)
    plain_batch, gated_batch = batch(plain), batch(gated)
    assert max_abs_diff(gated_batch, plain_batch) > 1e-4, "T-GATE changed the batch"
    for image in (1, 2):
        plain_error = max_abs_diff(plain_batch[image], alone(plain, image))
        gated_error = max_abs_diff(gated_batch[image], alone(gated, image))
        assert gated_error <= max(1e-4, 10 * plain_error), f"image {image}: {gated_error} off its own generation"


def _four_images(call: dict, per_prompt: str, image: int | None) -> dict:
    """``call`` for two prompts and two images of each (``image``: that image alone), as text or,
    for a pipeline called with embeddings, as two different embeddings of each prompt."""
    if "prompt" in call:
        if image is not None:
            return call | dict(prompt=PROMPTS[image // 2], negative_prompt=NEGATIVES[image // 2], **{per_prompt: 1})
        if per_prompt == "num_images_per_prompt":
            return call | dict(prompt=PROMPTS, negative_prompt=NEGATIVES, **{per_prompt: 2})
        # video and audio pipelines of diffusers 0.42.1 do not all honour several videos per prompt
        return call | dict(prompt=[p for p in PROMPTS for _ in "ab"], negative_prompt=[n for n in NEGATIVES for _ in "ab"])
    # embeddings are repeated per image here (some pipelines do not repeat given embeddings)
    call = dict(call)
    for key, value in call.items():
        if isinstance(value, torch.Tensor) and key.endswith(("embeds", "mask")) and value.shape[0] == 1:
            other = value.roll(1, dims=-1) if key.endswith("embeds") else value
            rows = torch.cat([value, value, other, other])
            call[key] = rows if image is None else rows[image:image + 1]
    return call


def _frames(result):
    for attribute in ("images", "frames", "audios"):
        if hasattr(result, attribute):
            return getattr(result, attribute)
    return result[0]


def test_sdxl_micro_conditioning_laid_out_per_image_is_cut_as_the_reference_cuts_it(reference):
    """SDXL concatenates the negative and positive size conditioning, then repeats the pair per
    image: ``[negative, prompt, negative, prompt]``. After the gate the reference gives every
    image the negative part's conditioning."""
    call = dict(
        prompt=PROMPTS, negative_prompt=NEGATIVES, num_images_per_prompt=2, num_inference_steps=5, height=32, width=32,
        negative_original_size=(16, 16), negative_target_size=(24, 24), negative_crops_coords_top_left=(4, 4),
        output_type="np",
    )
    settings = dict(gate_step=2, sp_interval=2, warm_up=0)
    expected = reference.TgateSDXLLoader(tiny_sdxl()).tgate(**settings, **call, generator=torch.Generator().manual_seed(0))
    enabled = tgate_kernels.enable(tiny_sdxl(), kernels="off", **settings)
    assert max_abs_diff(enabled(**call, generator=torch.Generator().manual_seed(0)), expected) <= 1e-5
    loader = tgate_kernels.TgateSDXLLoader(tiny_sdxl())
    assert max_abs_diff(loader.tgate(**settings, **call, generator=torch.Generator().manual_seed(0)), expected) <= 1e-5


# ---------------------------------------------------------------- one denoiser, several regions a step

def _panorama(compile_option=None, **schedule):
    from diffusers import StableDiffusionPanoramaPipeline

    pipe = StableDiffusionPanoramaPipeline(**tiny_sd().components)
    views = pipe.get_views
    # two disjoint 16x16 latent views side by side
    pipe.get_views = lambda height, width, window_size=64, stride=8, circular_padding=False: views(height, width, 16, 16, circular_padding)
    if schedule:
        tgate_kernels.enable(pipe, kernels="off", compile=compile_option, **schedule)
    return pipe


def _panorama_latents():
    return torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("compile_option", [None, {"backend": "eager"}], ids=["eager", "compiled"])
def test_a_denoiser_run_once_per_region_keeps_each_regions_caches(compile_option):
    """MultiDiffusion calls the UNet once per view at the same timestep: with disjoint views
    each tile of the panorama is T-GATE's image of that tile alone."""
    schedule = dict(gate_step=3, sp_interval=2, warm_up=0)
    latents = _panorama_latents()
    call = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=6, output_type="latent")
    pipe = _panorama(compile_option, **schedule)
    with tgate_kernels.view(pipe).record() as record:
        panorama = pipe(**call, height=128, width=256, latents=latents).images
    assert record.rows_run(4) == [1, 1], "after the gate both views run on one part"
    alone = tgate_kernels.enable(tiny_sd(), kernels="off", **schedule)
    for view in range(2):
        region = slice(16 * view, 16 * (view + 1))
        tile = alone(**call, height=128, width=128, latents=latents[..., region].contiguous()).images
        assert max_abs_diff(panorama[..., region], tile) <= 1e-5, f"view {view}"
    again = pipe(**call, height=128, width=256, latents=latents).images
    assert max_abs_diff(again, panorama) == 0.0


@pytest.mark.parametrize("compile_option", [None, {"backend": "eager"}], ids=["eager", "compiled"])
def test_a_module_run_twice_within_one_denoiser_call_is_refused_at_the_first_step(compile_option):
    """FreeNoise runs each motion module once per window of frames within one UNet call."""
    family = FAMILIES["animatediff"]
    free_noise = dict(context_length=2, context_stride=1)
    expected = family.build()
    expected.enable_free_noise(**free_noise)
    expected = expected(**family.call_kwargs(4)).frames
    pipe = family.build()
    pipe.enable_free_noise(**free_noise)
    tgate_kernels.enable(pipe, compile=compile_option, **SCHEDULE)
    with tgate_kernels.view(pipe).record() as record:
        with pytest.raises(RuntimeError, match="ran a second time within one call of `unet`") as info:
            pipe(**family.call_kwargs(4))
    assert "in step 0" in str(info.value) and record.steps == [0]
    tgate_kernels.disable(pipe)
    assert max_abs_diff(pipe(**family.call_kwargs(4)).frames, expected) == 0.0, "nothing was left behind"


def test_an_extra_denoiser_call_per_step_is_refused_in_the_first_step_and_described():
    from diffusers import StableDiffusionSAGPipeline

    pipe = tgate_kernels.enable(StableDiffusionSAGPipeline(**tiny_sd().components), **SCHEDULE)
    call = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=4, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    with pytest.raises(tgate_kernels.GuidanceNotRecognised) as info:
        pipe(**call)
    message = str(info.value)
    assert "in step 0, call 2 of `unet` ran on 1 rows for 1 latents" in message
    assert "[negative, prompt]" in message and "extra denoiser call" in message and "separate calls" not in message.split("Supported")[0]
    plain = StableDiffusionSAGPipeline(**tiny_sd().components)(**call, sag_scale=0.0).images
    assert max_abs_diff(pipe(**call, sag_scale=0.0).images, plain) > 0, "without the extra call T-GATE runs"


def test_gligen_grounding_inputs_are_cut_with_the_batch():
    """GLIGEN passes its boxes, phrase embeddings and masks, one block of rows per part, inside
    ``cross_attention_kwargs['gligen']``."""
    from diffusers import StableDiffusionGLIGENPipeline
    from fixtures.tiny_pipelines import _sd_unet_kwargs, _unet

    def build():
        components = {k: v for k, v in tiny_sd().components.items() if k != "image_encoder"}
        return StableDiffusionGLIGENPipeline(**components | {"unet": _unet(0, attention_type="gated", **_sd_unet_kwargs())})

    call = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, gligen_phrases=["a fox", "a house"],
                gligen_boxes=[[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]], gligen_scheduled_sampling_beta=1.0,
                num_inference_steps=5, height=32, width=32, output_type="latent")
    pipe = tgate_kernels.enable(build(), kernels="off", gate_step=2, sp_interval=1, warm_up=0)
    with tgate_kernels.view(pipe).record() as record:
        changed, gated = first_changed_step(pipe, build(), lambda: dict(call, generator=torch.Generator().manual_seed(0)))
    assert [record.rows_run(step) for step in record.steps] == [[4], [4], [2], [2], [2]]
    assert changed is not None and changed >= 2 and torch.isfinite(gated.images).all(), "steps before the gate are the plain ones"


def test_single_part_calls_beside_the_guided_batch_are_refused_in_the_first_step():
    """Attend-and-excite runs the UNet on the prompt's latents alone (gradient steps on them)
    before its guided batch, every step."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    components = {k: v for k, v in tiny_sd().components.items() if k != "image_encoder"}
    pipe = tgate_kernels.enable(StableDiffusionAttendAndExcitePipeline(**components), **SCHEDULE)
    call = dict(prompt="a cat and a dog", token_indices=[2, 5], num_inference_steps=4, height=32, width=32,
                output_type="latent", max_iter_to_alter=2, generator=torch.Generator().manual_seed(0))
    with tgate_kernels.view(pipe).record() as record:
        with pytest.raises((tgate_kernels.GuidanceNotRecognised, ValueError)) as info:
            pipe(**call)
    assert record.steps == [0]
    assert "attend-and-excite" in str(info.value) and "separate calls [" not in str(info.value)
