"""DeepCache together with T-GATE: parity with the reference's DeepCache loaders, full vs
shallow UNet passes per step, clean state, and disable in any order."""

import numpy as np
import pytest
import torch

import tgate_kernels
from fixtures.tiny_pipelines import tiny_image, tiny_pixart_alpha, tiny_sd, tiny_sdxl

from conftest import DEEPCACHE_LOADERS as LOADERS
from conftest import FACTORIES
from conftest import max_abs_diff as _diff


def call(**extra):
    return dict(dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=8, height=32,
                     width=32, output_type="np", generator=torch.Generator().manual_seed(0)), **extra)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("gate, interval, branch", [(3, 3, 0), (4, 2, 1), (1, 3, 0)])
def test_parity_with_reference_deepcache_loaders(family, gate, interval, branch, reference):
    tgate = reference
    reference = getattr(tgate, LOADERS[family])(FACTORIES[family](), cache_interval=interval, cache_branch_id=branch)
    expected = reference.tgate(gate_step=gate, **call())

    loaded = getattr(tgate_kernels, LOADERS[family])(FACTORIES[family](), cache_interval=interval, cache_branch_id=branch)
    assert _diff(loaded.tgate(gate_step=gate, **call()), expected) <= 1e-5

    enabled = tgate_kernels.enable(FACTORIES[family](), gate_step=gate, sp_interval=1, warm_up=0,
                                   deepcache={"cache_interval": interval, "cache_branch_id": branch})
    assert _diff(enabled(**call()), expected) <= 1e-5


def _count_full_passes(pipe):
    """A full UNet pass runs the mid block's resnets; DeepCache's shallow passes skip them. Steps
    are counted by the progress bar's updates, as the pipeline counts them."""
    passes: dict[int, int] = {}
    step = [0]

    def count(module, args, output):
        passes[step[0]] = passes.get(step[0], 0) + 1

    def next_step(pipe_, i, t, callback_kwargs):
        step[0] = i + 1
        return callback_kwargs

    pipe.unet.mid_block.resnets[0].register_forward_hook(count)
    return passes, next_step


@pytest.mark.parametrize("gate, interval", [(4, 3), (5, 2), (2, 4)])
def test_full_and_shallow_passes_follow_cache_interval_and_the_gate(gate, interval):
    steps = 10
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=gate, deepcache={"cache_interval": interval, "cache_branch_id": 0})
    passes, next_step = _count_full_passes(pipe)
    pipe(**call(num_inference_steps=steps, callback_on_step_end=next_step))
    before_gate = {s for s in range(gate - 1) if s % interval == 0}
    restarted = {gate - 1, *range(gate, steps, interval)}
    assert set(passes) == before_gate | restarted
    assert all(n == 1 for n in passes.values())


def _deepcache_residue(pipe):
    return [name for name, m in pipe.unet.named_modules() if name and "forward" in m.__dict__
            and not hasattr(m, "_diffusers_hook")]


def test_no_deepcache_state_between_calls_or_after_an_exception():
    pipe = tgate_kernels.TgateSDDeepCacheLoader(tiny_sd(), cache_interval=2, cache_branch_id=0)
    first = pipe.tgate(gate_step=3, **call())
    assert tgate_kernels.view(pipe).deepcache == {"cache_interval": 2, "cache_branch_id": 0}
    assert _deepcache_residue(pipe) == []

    def explode(pipe_, step, timestep, callback_kwargs):
        if step == 4:
            raise RuntimeError("boom")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="boom"):
        pipe.tgate(gate_step=3, callback_on_step_end=explode, **call())
    assert _deepcache_residue(pipe) == []
    assert _diff(pipe.tgate(gate_step=3, **call()), first) == 0.0


@pytest.mark.parametrize("order", ["tgate-loader-then-deepcache-loader", "deepcache-loader-then-enable", "enable-with-deepcache"])
def test_disable_removes_both_in_any_order(order):
    baseline = tiny_sdxl()(**call())
    pipe = tiny_sdxl()
    if order == "tgate-loader-then-deepcache-loader":
        pipe = tgate_kernels.TgateSDXLLoader(pipe, gate_step=3, num_inference_steps=8)
        pipe = tgate_kernels.TgateSDXLDeepCacheLoader(pipe, cache_interval=3, cache_branch_id=0)
        gated = pipe.tgate(gate_step=3, **call())
        assert np.array_equal(pipe(**call()).images, baseline.images), "a loader leaves the plain call alone"
    elif order == "deepcache-loader-then-enable":
        pipe = tgate_kernels.TgateSDXLDeepCacheLoader(pipe, cache_interval=3, cache_branch_id=0)
        tgate_kernels.enable(pipe, gate_step=3)
        gated = pipe(**call())
    else:
        gated = tgate_kernels.enable(pipe, gate_step=3, deepcache={"cache_interval": 3, "cache_branch_id": 0})(**call())
    assert tgate_kernels.view(pipe).tgate_deepcache is not None, "pipe.tgate runs DeepCache (a loader's, else enable's)"
    assert _diff(gated, baseline) > 0
    tgate_kernels.disable(pipe)
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert np.array_equal(pipe(**call()).images, baseline.images)


def test_img2img_with_deepcache_through_enable():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd())
    baseline = pipe(**call(image=tiny_image(), strength=0.75))
    tgate_kernels.enable(pipe, gate_step=2, deepcache={"cache_interval": 2, "cache_branch_id": 0})
    passes, next_step = _count_full_passes(pipe)
    gated = pipe(**call(image=tiny_image(), strength=0.75, callback_on_step_end=next_step))
    assert tgate_kernels.view(pipe).last_generation.num_steps == 6
    assert set(passes) == {0, 1, 2, 4}
    assert _diff(gated, baseline) > 0
    tgate_kernels.disable(pipe)
    assert np.array_equal(pipe(**call(image=tiny_image(), strength=0.75)).images, baseline.images)


def test_enable_false_removes_deepcache_and_none_keeps_it():
    pipe = tgate_kernels.enable(tiny_sd(), deepcache={"cache_interval": 2, "cache_branch_id": 0})
    tgate_kernels.enable(pipe, gate_step=4)
    assert tgate_kernels.view(pipe).deepcache == {"cache_interval": 2, "cache_branch_id": 0}
    tgate_kernels.enable(pipe, gate_step=4, deepcache=False)
    assert tgate_kernels.view(pipe).deepcache is None


@pytest.mark.parametrize(
    "option, error, words",
    [
        ({"cache_interval": 0, "cache_branch_id": 0}, ValueError, ["cache_interval", "0", ">= 1"]),
        ({"cache_interval": 3, "cache_branch_id": -1}, ValueError, ["cache_branch_id", "-1"]),
        ({"cache_interval": 3, "cache_branch_id": 99}, ValueError, ["cache_branch_id", "99", "below 6"]),
        ({"cache_interval": 2.0, "cache_branch_id": 0}, TypeError, ["cache_interval", "2.0", "float"]),
        ({"interval": 3}, ValueError, ["interval", "cache_interval"]),
        (3, TypeError, ["deepcache", "3"]),
    ],
)
def test_bad_deepcache_options_are_refused_before_anything_is_modified(option, error, words):
    pipe = tiny_sd()
    before = set(pipe.__dict__)
    with pytest.raises(error) as info:
        tgate_kernels.enable(pipe, deepcache=option)
    assert all(w in str(info.value) for w in words)
    assert set(pipe.__dict__) == before and not hasattr(pipe.unet, "_diffusers_hook")


def test_deepcache_on_a_transformer_pipeline_is_refused():
    with pytest.raises(ValueError, match="needs a pipeline with a UNet"):
        tgate_kernels.enable(tiny_pixart_alpha(), deepcache={"cache_interval": 3, "cache_branch_id": 0})


def test_a_plain_loader_after_a_deepcache_loader_is_t_gate_alone():
    pipe = tgate_kernels.TgateSDDeepCacheLoader(tiny_sd(), cache_interval=2, cache_branch_id=0)
    tgate_kernels.TgateSDLoader(pipe, gate_step=3)
    view = tgate_kernels.view(pipe)
    assert view.deepcache is None and view.config.sp_interval == 5
    expected = tgate_kernels.TgateSDLoader(tiny_sd(), gate_step=3).tgate(**call())
    assert _diff(pipe.tgate(**call()), expected) == 0.0
