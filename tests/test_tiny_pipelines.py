"""Tests for the offline tiny pipelines the test-suite builds everything on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.tiny_pipelines import (
    SCHEDULERS,
    TINY_IMAGE_SIZE,
    TINY_PIPELINES,
    TINY_PIXART_IMAGE_SIZE,
    TINY_SVD_NUM_FRAMES,
    make_scheduler,
    tiny_generation_kwargs,
    tiny_image,
    tiny_pipeline,
    tiny_sd,
)

from conftest import REFERENCE_LOADERS

EXPECTED_PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "lcm-sdxl": "StableDiffusionXLPipeline",
    "pixart-alpha": "PixArtAlphaPipeline",
    "pixart-sigma": "PixArtSigmaPipeline",
    "svd": "StableVideoDiffusionPipeline",
    "sd-controlnet": "StableDiffusionControlNetPipeline",
    "sdxl-controlnet": "StableDiffusionXLControlNetPipeline",
}

NAMES = list(EXPECTED_PIPELINE_CLASSES)


def _expected_image_shape(name: str) -> tuple[int, ...]:
    if name == "svd":
        return (1, TINY_SVD_NUM_FRAMES, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    size = TINY_PIXART_IMAGE_SIZE if name.startswith("pixart") else TINY_IMAGE_SIZE
    return (1, size, size, 3)


def _generate(pipe, name: str, steps: int = 2, output_type: str = "np", **overrides):
    kwargs = tiny_generation_kwargs(name, num_inference_steps=steps, output_type=output_type)
    kwargs.update(overrides)
    output = pipe(**kwargs)
    result = output.frames if name == "svd" else output.images
    return np.asarray(result) if output_type == "np" else result


def _module_state(pipe) -> dict[str, torch.Tensor]:
    state = {}
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                state[f"{component_name}.{key}"] = value
    return state


def _assert_states_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    mismatched = [key for key in left if not torch.equal(left[key], right[key])]
    assert not mismatched, f"weights differ: {mismatched[:5]}"


def test_registry_covers_every_pipeline_kind():
    assert list(TINY_PIPELINES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_factory_builds_deterministic_cpu_float32_pipeline(name):
    rng_state = torch.get_rng_state()
    pipe = tiny_pipeline(name, seed=0)
    # Seeding happens in a forked RNG, so building must not disturb the caller's stream.
    assert torch.equal(torch.get_rng_state(), rng_state)

    assert type(pipe).__name__ == EXPECTED_PIPELINE_CLASSES[name]
    assert pipe._progress_bar_config.get("disable") is True
    state = _module_state(pipe)
    assert state, "pipeline has no weights"
    float_dtypes = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
    assert float_dtypes == {torch.float32}
    assert {tensor.device.type for tensor in state.values()} == {"cpu"}
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training

    same_seed = tiny_pipeline(name, seed=0)
    _assert_states_equal(state, _module_state(same_seed))

    other_seed = _module_state(tiny_pipeline(name, seed=1))
    assert state.keys() == other_seed.keys()
    differing = [key for key in state if not torch.equal(state[key], other_seed[key])]
    # Every randomly initialised component must depend on the seed, not only one of them.
    differing_components = {key.split(".", 1)[0] for key in differing}
    nn_components = {n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert differing_components == nn_components


@pytest.mark.parametrize("name", NAMES)
def test_generation_shape_and_determinism(name):
    pipe = tiny_pipeline(name, seed=0)
    images = _generate(pipe, name)
    assert images.shape == _expected_image_shape(name)
    assert images.dtype == np.float32
    assert np.isfinite(images).all()
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Random weights still have to produce structured, non-constant images.
    assert images.std() > 1e-3

    np.testing.assert_array_equal(images, _generate(tiny_pipeline(name, seed=0), name))
    assert not np.allclose(images, _generate(tiny_pipeline(name, seed=1), name), atol=1e-4)


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart-alpha", "svd"])
def test_latent_output_shape(name):
    pipe = tiny_pipeline(name)
    latents = _generate(pipe, name, output_type="latent")
    if name == "svd":
        expected = (1, TINY_SVD_NUM_FRAMES, 4, TINY_IMAGE_SIZE // 2, TINY_IMAGE_SIZE // 2)
    elif name.startswith("pixart"):
        expected = (1, 4, TINY_PIXART_IMAGE_SIZE // 8, TINY_PIXART_IMAGE_SIZE // 8)
    else:
        expected = (1, 4, TINY_IMAGE_SIZE // 2, TINY_IMAGE_SIZE // 2)
    assert tuple(latents.shape) == expected


@pytest.mark.parametrize("name", ["sd", "sdxl", "pixart-alpha", "pixart-sigma"])
def test_prompt_changes_the_output(name):
    # Guards against tokenizers that map every word to <unk>, which would make prompts irrelevant.
    pipe = tiny_pipeline(name)
    first = _generate(pipe, name, output_type="latent", prompt="a tiny red fox")
    second = _generate(pipe, name, output_type="latent", prompt="an astronaut on mars")
    assert not torch.allclose(first, second, atol=1e-4)


@pytest.mark.parametrize("name", ["sd-controlnet", "sdxl-controlnet"])
def test_control_image_changes_the_output(name):
    pipe = tiny_pipeline(name)
    first = _generate(pipe, name, output_type="latent", image=tiny_image(seed=0))
    second = _generate(pipe, name, output_type="latent", image=tiny_image(seed=1))
    assert not torch.allclose(first, second, atol=1e-4)


def test_clip_tokenizer_round_trips_text():
    tokenizer = tiny_sd().tokenizer
    max_length = tokenizer.model_max_length
    encoded = tokenizer("A tiny red fox", padding="max_length", max_length=max_length)
    ids = encoded.input_ids
    assert len(ids) == tokenizer.model_max_length == 77
    assert ids[0] == tokenizer.bos_token_id
    # Without merges every character is one token; CLIP's unk token is its EOS token, so an
    # unknown character would show up as an early EOS.
    assert ids.index(tokenizer.eos_token_id) == 1 + len("atinyredfox")
    # CLIP lower-cases its input.
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a tiny red fox"


def test_t5_tokenizer_supports_pixart_calls():
    tokenizer = tiny_pipeline("pixart-alpha").tokenizer
    encoded = tokenizer(
        "a tiny red fox",
        padding="max_length",
        max_length=16,
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids = encoded.input_ids[0].tolist()
    length = len("a tiny red fox")
    assert encoded.input_ids.shape == (1, 16)
    assert ids[length] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0
    assert ids[length + 1 :] == [tokenizer.pad_token_id] * (15 - length)
    assert encoded.attention_mask[0].tolist() == [1] * (length + 1) + [0] * (15 - length)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a tiny red fox"


def test_unknown_pipeline_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        tiny_pipeline("sd3")
    message = str(error.value)
    assert "'sd3'" in message
    for name in NAMES:
        assert name in message
    with pytest.raises(ValueError, match="pixart-sigma"):
        tiny_generation_kwargs("flux")


def test_scheduler_option_keeps_noise_schedule():
    pipe = tiny_sd(scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    default = tiny_sd().scheduler
    assert type(default).__name__ == "DDIMScheduler"
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert pipe.scheduler.config[key] == default.config[key]
    with pytest.raises(ValueError, match="unipc"):
        tiny_sd(scheduler="no-such-scheduler")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_generates(scheduler):
    pipe = tiny_sd(scheduler=scheduler)
    expected_class = type(make_scheduler(scheduler, pipe.scheduler.config))
    assert type(pipe.scheduler) is expected_class
    # Two steps is what the fast tests use; PNDM only supports that without Runge-Kutta warm-up.
    images = _generate(pipe, "sd", steps=2)
    assert images.shape == _expected_image_shape("sd")
    assert np.isfinite(images).all()


def test_lcm_sdxl_uses_guidance_embedding_instead_of_cfg():
    pipe = tiny_pipeline("lcm-sdxl")
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.unet.config.time_cond_proj_dim is not None
    # Same UNet topology as the SDXL pipeline apart from the guidance embedding.
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert tiny_pipeline("sdxl").unet.config.time_cond_proj_dim is None


def test_tiny_image_is_deterministic():
    image = tiny_image()
    assert image.mode == "RGB" and image.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert tiny_image(height=24, width=40).size == (40, 24)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(tiny_image()))
    assert not np.array_equal(np.asarray(image), np.asarray(tiny_image(seed=1)))


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(name, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = tiny_pipeline(name)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    assert type(loaded) is type(pipe)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    _assert_states_equal(_module_state(pipe), _module_state(loaded))
    for component_name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, component_name, None) is not None:
            original, reloaded = getattr(pipe, component_name), getattr(loaded, component_name)
            text = "a tiny red fox"
            assert reloaded(text).input_ids == original(text).input_ids
            assert reloaded.model_max_length == original.model_max_length

    expected = _generate(pipe, name, output_type="latent")
    actual = _generate(loaded, name, output_type="latent")
    # Weights are bit-identical; memory-mapped tensors may take different BLAS paths, hence atol.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Compatibility with the reference T-GATE implementation (tgate==1.0.0), which the parity tests
# run on these pipelines.  Its attention caches live on the Attention modules across calls, so
# every reference call gets a freshly built pipeline.
# --------------------------------------------------------------------------------------------

REFERENCE_STEPS = 5


def _reference_latents(
    tgate, name: str, loader_name: str, call_kwargs: dict, loader_kwargs: dict | None = None, **schedule
):
    pipe = getattr(tgate, loader_name)(tiny_pipeline(name), **(loader_kwargs or {}))
    kwargs = tiny_generation_kwargs(name, num_inference_steps=REFERENCE_STEPS, output_type="latent")
    output = pipe.tgate(**kwargs, **call_kwargs, **schedule)
    return output.frames if name == "svd" else output.images


@pytest.mark.parametrize("name", list(REFERENCE_LOADERS))
def test_reference_tgate_runs_and_matches_plain_pipeline_when_not_gating(name, reference):
    loader_name, call_kwargs = REFERENCE_LOADERS[name]
    plain = _generate(tiny_pipeline(name), name, steps=REFERENCE_STEPS, output_type="latent")

    # Gate and warm-up past the last step: nothing is cached, so the reference must reproduce
    # the pipeline's own computation.
    never = REFERENCE_STEPS + 1
    ungated = _reference_latents(reference, name, loader_name, call_kwargs, gate_step=never, warm_up=never)
    torch.testing.assert_close(ungated, plain, rtol=0, atol=1e-6)

    gated = _reference_latents(
        reference, name, loader_name, call_kwargs, gate_step=2, warm_up=1, sp_interval=2, fi_interval=2
    )
    assert gated.shape == plain.shape
    assert torch.isfinite(gated).all()
    # Caching must have an observable effect on these models, or parity tests would prove nothing.
    assert not torch.allclose(gated, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "loader_name"),
    [("sd", "TgateSDDeepCacheLoader"), ("sdxl", "TgateSDXLDeepCacheLoader")],
)
@pytest.mark.parametrize("cache_branch_id", [0, 2])
def test_reference_deepcache_loaders_run(name, loader_name, cache_branch_id, reference):
    plain = _generate(tiny_pipeline(name), name, steps=REFERENCE_STEPS, output_type="latent")
    latents = _reference_latents(
        reference,
        name,
        loader_name,
        {},
        loader_kwargs={"cache_interval": 3, "cache_branch_id": cache_branch_id},
        gate_step=2,
        warm_up=1,
    )
    assert latents.shape == plain.shape
    assert torch.isfinite(latents).all()
    assert not torch.allclose(latents, plain, rtol=0, atol=1e-5)
