"""The engine on Stable Diffusion and SDXL: parity with the reference, schedule counts,
per-call state, disable, bad input."""

import types

import numpy as np
import pytest
import torch

import tgate_kernels
from tgate_kernels.config import TgateConfig
from tgate_kernels.schedule import AttentionAction, plan_generation
from fixtures.tiny_pipelines import tiny_sd, tiny_sdxl

from conftest import FACTORIES, NEGATIVE, PROMPTS, REFERENCE_LOADERS, generate, max_abs_diff, hooked_modules


def reference_images(tgate, family, scheduler=None, *, steps=6, **settings):
    pipe = getattr(tgate, REFERENCE_LOADERS[family][0])(FACTORIES[family](scheduler=scheduler))
    return generate(pipe, pipe.tgate, steps=steps, **settings)


def recorded(pipe, **kwargs):
    """``generate`` with a recorder attached; returns the images and the record."""
    with tgate_kernels.view(pipe).record() as record:
        images = generate(pipe, **kwargs)
    return images, record


PARITY_CASES = [
    # family, scheduler, gate_step, sp_interval, fi_interval, warm_up
    ("sd", None, 3, 5, 1, 2),
    ("sd", None, 1, 5, 1, 2),
    ("sd", "dpm", 4, 2, 1, 0),
    ("sd", "euler", 2, 1, 2, 1),
    ("sd", "pndm", 3, 2, 1, 0),
    ("sdxl", None, 3, 5, 1, 2),
    ("sdxl", "dpm", 2, 2, 1, 0),
    ("sdxl", None, 5, 3, 2, 1),
]


@pytest.mark.parametrize("family, scheduler, gate, sp, fi, warm_up", PARITY_CASES)
def test_parity_with_reference(family, scheduler, gate, sp, fi, warm_up, reference):
    settings = dict(gate_step=gate, sp_interval=sp, fi_interval=fi, warm_up=warm_up)
    expected = reference_images(reference, family, scheduler, **settings)

    loaded = getattr(tgate_kernels, REFERENCE_LOADERS[family][0])(FACTORIES[family](scheduler=scheduler))
    assert max_abs_diff(generate(loaded, loaded.tgate, **settings), expected) <= 1e-5

    enabled = tgate_kernels.enable(FACTORIES[family](scheduler=scheduler), **settings)
    assert max_abs_diff(generate(enabled), expected) <= 1e-5

    baseline = generate(FACTORIES[family](scheduler=scheduler))
    assert max_abs_diff(expected, baseline) > 1e-6, "T-GATE must change the result after the gate"


def test_parity_with_guidance_rescale_and_images_per_prompt(reference):
    settings = dict(gate_step=2, sp_interval=2, warm_up=0)
    extra = dict(guidance_rescale=0.7, num_images_per_prompt=2)
    expected = reference_images(reference, "sd", **settings, **extra)
    ours = generate(tgate_kernels.enable(tiny_sd(), **settings), **extra)
    assert ours.shape[0] == 4
    assert max_abs_diff(ours, expected) <= 1e-5


def test_prompt_embeds_inputs_match_prompt_strings():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    from_strings = generate(pipe)
    embeds, negative_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVE)
    from_embeds = generate(pipe, prompt=None, negative=None, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds)
    assert max_abs_diff(from_embeds, from_strings) == 0.0


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_attention_computations_and_batches_follow_the_schedule(family):
    options = dict(gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)
    settings = TgateConfig(**options)
    pipe = tgate_kernels.enable(FACTORIES[family](), **options)
    attentions = tgate_kernels.view(pipe).attentions
    n_cross = sum(a.cross for a in attentions)
    n_self = len(attentions) - n_cross
    assert n_cross > 0 and n_self > 0
    steps = 8
    _, record = recorded(pipe, steps=steps)
    for plan in plan_generation(settings, steps):
        for cross, action, n in ((True, plan.cross_attention, n_cross), (False, plan.self_attention, n_self)):
            computed, reused = record.computed(plan.step, cross), record.reused(plan.step, cross)
            if action is AttentionAction.REUSE:
                assert (computed, reused) == (0, n), (plan, cross)
            else:
                assert (computed, reused) == (n, 0), (plan, cross)
        assert record.rows_run(plan.step) == [4 if plan.cfg_batch else 2], plan


def test_disable_and_never_enabled_give_identical_images():
    baseline = generate(tiny_sd())
    pipe = tiny_sd()
    forward_before = dict(pipe.unet.__dict__)
    tgate_kernels.enable(pipe, gate_step=2)
    assert not np.array_equal(generate(pipe), baseline)
    tgate_kernels.disable(pipe)
    assert np.array_equal(generate(pipe), baseline)
    assert "forward" not in pipe.unet.__dict__ and not hasattr(pipe.unet, "_diffusers_hook")
    assert set(pipe.unet.__dict__) == set(forward_before)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in pipe.unet.modules())
    assert "progress_bar" not in pipe.__dict__ and "prepare_latents" not in pipe.__dict__
    assert not hasattr(pipe, "tgate") and not tgate_kernels.is_enabled(pipe) and tgate_kernels.view(pipe) is None
    tgate_kernels.disable(pipe)  # a second disable is a no-op


def test_exception_mid_call_leaves_clean_state_and_next_call_is_unaffected():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, sp_interval=1, warm_up=0)
    expected = generate(tgate_kernels.enable(tiny_sd(), gate_step=2, sp_interval=1, warm_up=0))

    def explode(pipe_, step, timestep, callback_kwargs):
        if step == 3:
            raise RuntimeError("boom")
        return callback_kwargs

    with tgate_kernels.view(pipe).record() as record:
        with pytest.raises(RuntimeError, match="boom"):
            generate(pipe, callback_on_step_end=explode)
    assert record.steps == [0, 1, 2, 3] and record.reused(3, cross=True) > 0, "the call got past the gate"
    assert _nothing_cached(pipe)
    assert np.array_equal(generate(pipe), expected)


def _nothing_cached(pipe) -> bool:
    """Every attention hook's cache is empty: reusing would find nothing."""
    hooks = [m._diffusers_hook.get_hook("tgate_attention_cache") for m in hooked_modules(pipe)
             if m._diffusers_hook.get_hook("tgate_attention_cache") is not None]
    return bool(hooks) and all(not h.caches for h in hooks)


def test_no_cache_outlives_a_call():
    pipe = tgate_kernels.enable(tiny_sdxl(), gate_step=2)
    generate(pipe)
    assert _nothing_cached(pipe)


def test_consecutive_calls_with_different_shapes_and_steps_match_fresh_pipelines():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=0.5, sp_interval=2, warm_up=0)
    calls = [
        dict(steps=6),
        dict(steps=4, height=48, width=32, prompt=PROMPTS[:1], negative=NEGATIVE[:1]),
        dict(steps=8, num_images_per_prompt=2),
    ]
    for call in calls:
        fresh = tgate_kernels.enable(tiny_sd(), gate_step=0.5, sp_interval=2, warm_up=0)
        assert max_abs_diff(generate(pipe, **call), generate(fresh, **call)) == 0.0
        assert tgate_kernels.view(pipe).last_generation.gate_step == call["steps"] // 2


def test_callback_on_step_end_sees_every_step():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2)
    seen = []

    def record(pipe_, step, timestep, callback_kwargs):
        seen.append((step, callback_kwargs["latents"].shape[0]))
        return callback_kwargs

    generate(pipe, steps=5, callback_on_step_end=record)
    assert seen == [(i, 2) for i in range(5)]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm", "pndm", "heun"])
def test_any_scheduler_runs_and_counts_solver_steps(scheduler):
    pipe = tgate_kernels.enable(tiny_sd(scheduler=scheduler), gate_step=3, sp_interval=1, warm_up=0)
    images, record = recorded(pipe, steps=5)
    assert np.isfinite(images).all()
    assert record.steps == list(range(5)), "every solver step is counted once, whatever the scheduler"
    calls_per_step = pipe.scheduler.order
    for step in record.steps:
        sizes = record.rows_run(step)
        assert all(size == (4 if step < 3 else 2) for size in sizes)
        if scheduler != "pndm":
            assert len(sizes) == calls_per_step or step == 4


def _independent_samples(pipe, method=None):
    """Batch of two prompts and each prompt alone, with per-sample generators."""
    method = method or pipe
    common = dict(num_inference_steps=6, guidance_scale=1.0, output_type="np", height=32, width=32)
    together = method(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **common).images
    alone = [method(p, generator=torch.Generator().manual_seed(s), **common).images[0] for s, p in enumerate(PROMPTS)]
    return together, np.stack(alone)


def test_generation_without_cfg_caches_without_averaging(reference):
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, sp_interval=1, warm_up=0)
    with tgate_kernels.view(pipe).record() as record:
        together, alone = _independent_samples(pipe)
    # the last call ran one prompt: batch 1 at every step, so no CFG batch was detected
    assert all(record.rows_run(step) == [1] for step in record.steps)
    assert tgate_kernels.view(pipe).last_generation.guidance == "no guidance"
    # never averaging two different samples: each sample is what it is alone
    assert max_abs_diff(together, alone) <= 1e-5
    # the reference's SD loader has no `lcm` switch: it averages the two samples at the gate,
    # and fails outright on a batch of one
    tgate = reference
    ref = tgate.TgateSDLoader(tiny_sd())
    settings = dict(gate_step=2, sp_interval=1, warm_up=0, num_inference_steps=6, guidance_scale=1.0, height=32, width=32)
    ref_together = ref.tgate(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np", **settings).images
    assert max_abs_diff(ref_together, together) > 1e-4
    with pytest.raises(ValueError):
        tgate.TgateSDLoader(tiny_sd()).tgate(PROMPTS[0], **settings)


def test_lcm_hint_contradicted_by_a_cfg_batch_warns_and_follows_the_pipeline():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, lcm=True)
    with pytest.warns(UserWarning, match="lcm=True"):
        images = generate(pipe)
    assert max_abs_diff(images, generate(tgate_kernels.enable(tiny_sd(), gate_step=2))) == 0.0


def test_loader_values_are_defaults_of_tgate_and_call_values_win():
    pipe = tgate_kernels.TgateSDLoader(tiny_sd(), gate_step=2, num_inference_steps=5)
    assert pipe.tgate(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32,
                      negative_prompt=NEGATIVE).images.shape == (2, 32, 32, 3)
    last = tgate_kernels.view(pipe).last_generation
    assert (last.num_steps, last.gate_step) == (5, 2)
    generate(pipe, pipe.tgate, steps=6, gate_step=4)
    last = tgate_kernels.view(pipe).last_generation
    assert (last.num_steps, last.gate_step) == (6, 4)
    # the ordinary call stays the baseline after a loader
    assert not tgate_kernels.is_enabled(pipe)
    assert np.array_equal(generate(pipe), generate(tiny_sd()))


def test_seed_usage_and_1_0_0_usage():
    pipe = tgate_kernels.TgateSDXLLoader(tiny_sdxl(), gate_step=3, num_inference_steps=5).to("cpu")
    with tgate_kernels.view(pipe).record() as record:
        image = pipe.tgate("Astronaut in a jungle", gate_step=3, num_inference_steps=5, height=32, width=32).images[0]
    assert image.size == (32, 32)
    assert [record.computed(step, cross=True) > 0 for step in range(5)] == [True] * 3 + [False] * 2
    pipe = tgate_kernels.TgateSDXLLoader(tiny_sdxl())
    assert pipe.tgate("Astronaut", num_inference_steps=4, gate_step=2, height=32, width=32).images[0].size == (32, 32)
    assert tgate_kernels.view(pipe).last_generation.gate_step == 2


def test_enabling_twice_updates_settings_without_stacking_hooks():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2)
    registries = {id(m): len(m._diffusers_hook.hooks) for m in pipe.unet.modules() if hasattr(m, "_diffusers_hook")}
    tgate_kernels.enable(pipe, gate_step=4, warm_up=0)
    tgate_kernels.TgateSDLoader(pipe, gate_step=3)
    assert registries == {id(m): len(m._diffusers_hook.hooks) for m in pipe.unet.modules() if hasattr(m, "_diffusers_hook")}
    assert pipe.unet in hooked_modules(pipe)
    generate(pipe, steps=5)
    assert tgate_kernels.view(pipe).last_generation.gate_step == 4, "a loader leaves the plain call's settings alone"
    generate(pipe, pipe.tgate, steps=5)
    assert tgate_kernels.view(pipe).last_generation.gate_step == 3


def test_context_manager_restores_previous_state():
    pipe = tiny_sd()
    baseline = generate(pipe)
    with tgate_kernels.enabled(pipe, gate_step=2) as same:
        assert same is pipe and tgate_kernels.is_enabled(pipe)
        assert not np.array_equal(generate(pipe), baseline)
    assert not tgate_kernels.is_enabled(pipe) and np.array_equal(generate(pipe), baseline)
    tgate_kernels.enable(pipe, gate_step=3)
    with tgate_kernels.enabled(pipe, gate_step=1, kernels="off", deepcache={"cache_interval": 2, "cache_branch_id": 0}):
        assert tgate_kernels.view(pipe).config.gate_step == 1
    view = tgate_kernels.view(pipe)
    assert (view.config.gate_step, view.kernels, view.deepcache) == (3, tgate_kernels.KernelMode.AUTO, None)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"gate_step": -2}, ValueError, ["gate_step", "-2"]),
        ({"gate_step": "late"}, TypeError, ["gate_step", "'late'"]),
        ({"sp_interval": 0}, ValueError, ["sp_interval", "0"]),
        ({"fi_interval": 0}, ValueError, ["fi_interval", "0"]),
        ({"warm_up": -1}, ValueError, ["warm_up", "-1"]),
    ],
)
def test_bad_input_is_refused_before_anything_is_modified(kwargs, error, words):
    pipe = tiny_sd()
    before = set(pipe.__dict__)
    with pytest.raises(error) as info:
        tgate_kernels.enable(pipe, **kwargs)
    assert all(w in str(info.value) for w in words)
    assert set(pipe.__dict__) == before and not hasattr(pipe.unet, "_diffusers_hook")
    with pytest.raises(error):
        tgate_kernels.TgateSDLoader(pipe, **kwargs)
    assert set(pipe.__dict__) == before


def test_gate_step_beyond_the_steps_is_refused_by_a_loader_and_never_reached_in_a_call():
    pipe = tgate_kernels.TgateSDLoader(tiny_sd())
    # as with the reference, pipe.tgate's default gate 10 is never reached in 4 steps
    with tgate_kernels.view(pipe).record() as record:
        with pytest.warns(UserWarning, match="`gate_step`=10 is beyond the 4 steps"):
            pipe.tgate(PROMPTS, num_inference_steps=4, height=32, width=32, output_type="np")
    assert all(record.rows_run(step) == [4] for step in range(4))
    with pytest.raises(ValueError, match="gate_step"):
        tgate_kernels.TgateSDLoader(tiny_sd(), gate_step=30, num_inference_steps=25)
    # an enabled pipeline learns the steps only when a call runs them (img2img's strength runs
    # fewer than asked for): a gate beyond them is never reached
    enabled = tgate_kernels.enable(tiny_sd(), gate_step=7, sp_interval=2, warm_up=1)
    with tgate_kernels.view(enabled).record() as record:
        with pytest.warns(UserWarning, match="`gate_step`=7 is beyond the 5 steps this call runs: cross-attention and "
                                             "classifier-free guidance are kept at every step; self-attention is still cached"):
            generate(enabled, steps=5)
    assert all(record.rows_run(step) == [4] and record.reused(step, cross=True) == 0 for step in range(5))
    assert [record.reused(step, cross=False) > 0 for step in range(5)] == [False, False, False, True, False]


def test_pipeline_without_cross_attention_is_refused():
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd()
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32, norm_num_groups=32,
    )
    before = set(pipe.__dict__)
    with pytest.raises(ValueError, match="without separate cross-attention") as info:
        tgate_kernels.enable(pipe)
    assert "Stable Diffusion" in str(info.value)
    assert set(pipe.__dict__) == before
    assert "no attention layers at all" in str(info.value)
    with pytest.raises(ValueError, match="no `unet` or `transformer`"):
        tgate_kernels.enable(types.SimpleNamespace(progress_bar=lambda **_: None))
    for not_a_pipeline in (None, object(), 3):
        for switch in (tgate_kernels.enable, tgate_kernels.disable, tgate_kernels.TgateSDLoader):
            with pytest.raises(TypeError, match="`pipe` must be a diffusers pipeline"):
                switch(not_a_pipeline)


def test_disabling_inside_the_context_manager_leaves_the_pipeline_disabled_and_enableable():
    pipe = tgate_kernels.TgateSDLoader(tiny_sd())
    with tgate_kernels.enabled(pipe, gate_step=2):
        tgate_kernels.disable(pipe)
    assert not any(hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert tgate_kernels.view(pipe) is None and "tgate" not in pipe.__dict__
    tgate_kernels.enable(pipe, gate_step=2)
    assert tgate_kernels.is_enabled(pipe)
