"""Every pipeline on the same blocks: PixArt-α/Σ, LCM, SVD, img2img, inpaint, ControlNet,
IP-Adapter, LoRA, offloading, second-order schedulers, and the refusal of joint attention."""

import types

import numpy as np
import pytest
import torch

import tgate_kernels
from fixtures.tiny_pipelines import (
    tiny_generation_kwargs,
    tiny_image,
    tiny_lcm_sdxl,
    tiny_pixart_alpha,
    tiny_pixart_sigma,
    tiny_sd,
    tiny_sd_controlnet,
    tiny_sdxl,
    tiny_sdxl_controlnet,
    tiny_svd,
)

from conftest import first_changed_step, max_abs_diff as _diff

PROMPTS = ["a cat", "a dog"]


def recorded(pipe, call_kwargs):
    """One call with a recorder attached; returns the result and the record."""
    with tgate_kernels.view(pipe).record() as record:
        result = pipe(**call_kwargs)
    return result, record


# ---------------------------------------------------------------- parity with the reference

def _pixart_call(**extra):
    return lambda: dict(prompt=PROMPTS, num_inference_steps=5, clean_caption=False, output_type="np",
                        generator=torch.Generator().manual_seed(0), **extra)


REFERENCE_CASES = {
    "pixart-alpha": (tiny_pixart_alpha, "TgatePixArtAlphaLoader", {}, _pixart_call()),
    "pixart-sigma": (tiny_pixart_sigma, "TgatePixArtSigmaLoader", {}, _pixart_call()),
    "pixart-lcm": (tiny_pixart_alpha, "TgatePixArtAlphaLoader", {"lcm": True}, _pixart_call(guidance_scale=0.0)),
    "lcm-sdxl": (tiny_lcm_sdxl, "TgateSDXLLoader", {"lcm": True}, lambda: dict(
        prompt=PROMPTS, num_inference_steps=4, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0))),
    "svd": (tiny_svd, "TgateSVDLoader", {}, lambda: tiny_generation_kwargs("svd", num_inference_steps=5)),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
@pytest.mark.parametrize("gate", [1, 2])
def test_parity_with_reference(case, gate, reference):
    tgate = reference
    factory, loader_name, reference_only, call = REFERENCE_CASES[case]
    settings = dict(gate_step=gate, sp_interval=2, warm_up=0)
    expected = getattr(tgate, loader_name)(factory()).tgate(**settings, **reference_only, **call())
    enabled = tgate_kernels.enable(factory(), **settings)
    assert _diff(enabled(**call()), expected) <= 1e-5
    loader = getattr(tgate_kernels, loader_name)(factory(), **reference_only)
    assert _diff(loader.tgate(**settings, **call()), expected) <= 1e-5


def test_lcm_works_with_the_hint_on_the_loader_on_the_call_and_unsaid():
    call = REFERENCE_CASES["lcm-sdxl"][3]
    unsaid = tgate_kernels.enable(tiny_lcm_sdxl(), gate_step=1)(**call())
    on_loader = tgate_kernels.TgateSDXLLoader(tiny_lcm_sdxl(), gate_step=1, num_inference_steps=4, lcm=True)
    on_call = tgate_kernels.TgateSDXLLoader(tiny_lcm_sdxl())
    assert _diff(on_loader.tgate(**call()), unsaid) == 0.0
    with tgate_kernels.view(on_call).record() as record:
        assert _diff(on_call.tgate(gate_step=1, lcm=True, **call()), unsaid) == 0.0
    assert {step: record.rows_run(step) for step in record.steps} == {step: [2] for step in range(4)}, \
        "LCM runs no CFG batch: nothing to halve"
    assert all(record.reused(step, cross=True) > 0 for step in (1, 2, 3)), "cross-attention is still gated"


# ---------------------------------------------------------------- seed examples, unchanged but for the import

def test_seed_pixart_example():
    pipe = tiny_pixart_alpha()
    pipe = tgate_kernels.TgatePixArtLoader(pipe, gate_step=8, num_inference_steps=25).to("cpu")
    with tgate_kernels.view(pipe).record() as record:
        image = pipe.tgate("An alpaca made of colorful building blocks, cyberpunk.", gate_step=8, num_inference_steps=25,
                           clean_caption=False).images[0]
    assert image.size == (256, 256) and tgate_kernels.view(pipe).last_generation.gate_step == 8
    assert [record.computed(step, cross=True) > 0 for step in range(25)] == [True] * 8 + [False] * 17
    assert [record.rows_run(step) for step in (7, 8)] == [[2], [1]]


def test_seed_sdxl_and_lcm_examples():
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    pipe = tiny_sdxl()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = tgate_kernels.TgateSDXLLoader(pipe, gate_step=10, num_inference_steps=25).to("cpu")
    with tgate_kernels.view(pipe).record() as record:
        image = pipe.tgate("Astronaut in a jungle, cold color palette, muted colors, detailed, 8k.",
                           gate_step=10, num_inference_steps=25).images[0]
    assert image.size == (32, 32)
    assert [record.computed(step, cross=True) > 0 for step in range(25)] == [True] * 10 + [False] * 15
    assert [record.rows_run(step) for step in (9, 10)] == [[2], [1]], "CFG dropped from the gate on"

    pipe = tiny_lcm_sdxl()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe = tgate_kernels.TgateSDXLLoader(pipe, gate_step=1, num_inference_steps=4, lcm=True).to("cpu")
    with tgate_kernels.view(pipe).record() as record:
        image = pipe.tgate("Astronaut in a jungle, cold color palette, muted colors, detailed, 8k.",
                           gate_step=1, num_inference_steps=4).images[0]
    assert image.size == (32, 32)
    assert [record.computed(step, cross=True) > 0 for step in range(4)] == [True, False, False, False]
    assert all(record.rows_run(step) == [1] for step in range(4)), "LCM: no CFG batch to drop"


# ---------------------------------------------------------------- every pipeline through enable(pipe)

def _img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd())


def _inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pipe(tiny_sd())


def _sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl())


def _ip_adapter_state_dict(unet):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection

    cross_attention_weights, key = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        if not name.endswith("attn1.processor"):
            weights = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim).state_dict()
            cross_attention_weights[f"{key}.to_k_ip.weight"] = weights["to_k_ip.0.weight"]
            cross_attention_weights[f"{key}.to_v_ip.weight"] = weights["to_v_ip.0.weight"]
            key += 2
    dim = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": projection["image_embeds.weight"], "proj.bias": projection["image_embeds.bias"],
                  "norm.weight": projection["norm.weight"], "norm.bias": projection["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": cross_attention_weights}


def _ip_adapter():
    pipe = tiny_sd()
    torch.manual_seed(1)
    pipe.unet._load_ip_adapter_weights([_ip_adapter_state_dict(pipe.unet)])
    return pipe


def _lora():
    from peft import LoraConfig

    pipe = tiny_sd()
    torch.manual_seed(2)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    return pipe


def _sd_call(**extra):
    return lambda: dict(dict(prompt=PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=6, height=32, width=32,
                             output_type="np", generator=torch.Generator().manual_seed(0)), **extra)


PIPELINES = {
    # name: (factory, call kwargs, gate_step, CFG on?)
    "sd-img2img": (_img2img, _sd_call(image=tiny_image(), strength=1.0), 3, True),
    "sd-inpaint": (_inpaint, _sd_call(image=tiny_image(), mask_image=tiny_image(seed=3).convert("L")), 3, True),
    "sdxl-img2img": (_sdxl_img2img, _sd_call(image=tiny_image(), strength=1.0), 3, True),
    "sd-controlnet": (tiny_sd_controlnet, _sd_call(image=tiny_image()), 3, True),
    "sdxl-controlnet": (tiny_sdxl_controlnet, _sd_call(image=tiny_image()), 3, True),
    "sd-ip-adapter": (_ip_adapter, lambda: dict(prompt="a cat", num_inference_steps=6, height=32, width=32,
                                                output_type="np", generator=torch.Generator().manual_seed(0),
                                                ip_adapter_image_embeds=[torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(5))]), 3, True),
    "sd-lora": (_lora, _sd_call(), 3, True),
    "pixart-alpha": (tiny_pixart_alpha, _pixart_call(), 3, True),
    "pixart-lcm": (tiny_pixart_alpha, _pixart_call(guidance_scale=0.0), 2, False),
    "lcm-sdxl": (tiny_lcm_sdxl, REFERENCE_CASES["lcm-sdxl"][3], 2, False),
    "svd": (tiny_svd, lambda: tiny_generation_kwargs("svd", num_inference_steps=5), 3, True),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_runs_gated_and_disable_restores_baseline(name):
    factory, call, gate, cfg = PIPELINES[name]
    baseline = factory()(**call())
    pipe = tgate_kernels.enable(factory(), gate_step=gate, sp_interval=1, warm_up=0)
    with tgate_kernels.view(pipe).record() as record:
        # self-attention computed at every step before the gate: those steps are the baseline's,
        # bit for bit, and the first step after it is not
        changed, gated = first_changed_step(pipe, factory(), call)
    assert changed is not None and changed >= gate, (name, changed)
    steps = record.steps
    assert len(steps) == record.num_steps and record.num_steps > gate
    for step in steps:
        crosses_computed = record.computed(step, cross=True)
        if step < gate:
            assert crosses_computed > 0
        else:
            assert crosses_computed == 0 and record.reused(step, cross=True) > 0, (name, step)
    first_batch = record.calls(0)[0].rows
    for step in steps:
        expected = first_batch // 2 if (cfg and step >= gate) else first_batch
        assert set(record.rows_run(step)) == {expected}, (name, step)
    assert np.isfinite(np.asarray(gated.frames if hasattr(gated, "frames") else gated.images, dtype=np.float64)).all()
    tgate_kernels.disable(pipe)
    assert _diff(pipe(**call()), baseline) == 0.0


def test_controlnet_cross_attention_is_gated_too():
    pipe = tgate_kernels.enable(tiny_sd_controlnet(), gate_step=2)
    view = tgate_kernels.view(pipe)
    assert view.denoisers == {"unet": pipe.unet, "controlnet": pipe.controlnet}
    assert any(a.cross for a in view.attentions if a.denoiser == "controlnet")
    _, record = recorded(pipe, _sd_call(image=tiny_image())())
    for step in range(6):
        computed, reused = record.computed(step, True, "controlnet"), record.reused(step, True, "controlnet")
        assert (computed > 0, reused > 0) == ((True, False) if step < 2 else (False, True)), step
        assert record.rows_run(step, "controlnet") == [4 if step < 2 else 2]


def test_img2img_gate_counts_the_steps_actually_run():
    pipe = tgate_kernels.enable(_img2img(), gate_step=0.5)
    _, record = recorded(pipe, _sd_call(image=tiny_image(), strength=0.5)() | {"num_inference_steps": 8})
    last = tgate_kernels.view(pipe).last_generation
    assert (last.num_steps, last.gate_step) == (4, 2)
    assert {step: record.rows_run(step) for step in record.steps} == {0: [4], 1: [4], 2: [2], 3: [2]}


@pytest.mark.parametrize("scheduler", ["heun", "kdpm2"])
def test_second_order_schedulers_gate_on_solver_steps(scheduler):
    pipe = tgate_kernels.enable(tiny_sd(scheduler=scheduler), gate_step=2, sp_interval=1, warm_up=0)
    result, record = recorded(pipe, _sd_call()() | {"num_inference_steps": 4})
    assert np.isfinite(result.images).all()
    batches = {step: record.rows_run(step) for step in record.steps}
    assert sorted(batches) == [0, 1, 2, 3]
    assert batches[0] == [4, 4] and batches[1] == [4, 4], "two denoiser calls per solver step, both with CFG before the gate"
    assert all(size == 2 for step in (2, 3) for size in batches[step])
    assert batches[3] == [2], "the last step closes on its first call"
    assert sum(len(v) for v in batches.values()) == len(pipe.scheduler.timesteps) == 2 * 4 - 1


# ---------------------------------------------------------------- coexistence

@pytest.mark.parametrize("order", ["offload-then-enable", "enable-then-offload"])
def test_model_cpu_offload_in_either_order(order):
    baseline = tiny_sd()(**_sd_call()())
    expected = tgate_kernels.enable(tiny_sd(), gate_step=3)(**_sd_call()())
    pipe = tiny_sd()
    if order == "enable-then-offload":
        tgate_kernels.enable(pipe, gate_step=3)
    pipe.enable_model_cpu_offload(device="cpu")
    if order == "offload-then-enable":
        tgate_kernels.enable(pipe, gate_step=3)
    assert _diff(pipe(**_sd_call()()), expected) == 0.0
    tgate_kernels.disable(pipe)
    assert hasattr(pipe.unet, "_hf_hook") and "forward" in pipe.unet.__dict__, "accelerate's hook survives disable"
    assert not hasattr(pipe.unet, "_diffusers_hook")
    assert _diff(pipe(**_sd_call()()), baseline) == 0.0


def test_accelerate_hooks_on_attention_modules_survive_disable():
    """``enable_sequential_cpu_offload`` puts accelerate hooks on every submodule; it needs an
    accelerator to run, so its mechanism is exercised directly on the attention modules."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    baseline = tiny_sd()(**_sd_call()())
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    attentions = [a.module for a in tgate_kernels.view(pipe).attentions]
    for module in attentions:
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu"))
    gated = pipe(**_sd_call()())
    tgate_kernels.disable(pipe)
    assert all(hasattr(m, "_hf_hook") and not hasattr(m, "_diffusers_hook") for m in attentions)
    assert _diff(pipe(**_sd_call()()), baseline) == 0.0
    for module in attentions:
        remove_hook_from_module(module)
    assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in attentions)
    assert _diff(gated, baseline) > 0


def test_pipe_to_dtype_after_enabling():
    expected = tiny_sd().to(torch.float64)(**_sd_call(output_type="latent")())
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3).to(torch.float64)
    with tgate_kernels.view(pipe).record() as record:
        changed, gated = first_changed_step(pipe, tiny_sd().to(torch.float64), _sd_call(output_type="latent"))
    assert gated.images.dtype == torch.float64 and torch.isfinite(gated.images).all()
    assert record.reused(4, cross=True) > 0 and record.computed(4, cross=True) == 0
    assert changed is not None and changed >= 3, "the steps before the gate are the float64 baseline's, bit for bit"
    tgate_kernels.disable(pipe)
    assert _diff(pipe(**_sd_call(output_type="latent")()), expected) == 0.0


# ---------------------------------------------------------------- refusal

def _joint_attention_transformers():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    yield SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4)
    yield FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                 axes_dims_rope=[4, 4, 8])


def test_joint_attention_pipelines_are_refused_with_the_supported_list():
    for transformer in _joint_attention_transformers():
        pipe = types.SimpleNamespace(transformer=transformer)
        with pytest.raises(ValueError) as info:
            tgate_kernels.enable(pipe)
        message = str(info.value)
        assert "joint attention" in message and "PixArt" in message and "Stable Diffusion" in message
        assert not hasattr(transformer, "_diffusers_hook")


def test_controlnet_in_guess_mode_keeps_the_part_it_conditions():
    """In guess mode the ControlNet sees the prompt's half only, and its residuals go to that half
    of the UNet's batch: after the gate the prompt's part runs, so the control still applies."""
    pipe = tgate_kernels.enable(tiny_sd_controlnet(), gate_step=2)
    result, record = recorded(pipe, _sd_call(image=tiny_image(), guess_mode=True)())
    assert np.isfinite(result.images).all()
    assert record.rows_run(0) == [2, 4] and record.rows_run(3) == [2, 2]
    assert [c.runs for c in record.calls(3)] == [("merged",), ("merged",)]
    assert "prompt part kept" in tgate_kernels.view(pipe).last_generation.guidance
    conditional = tgate_kernels.enable(tiny_sd_controlnet(), gate_step=2, kept_part="conditional")
    assert _diff(result, conditional(**_sd_call(image=tiny_image(), guess_mode=True)())) == 0.0
    negative = tgate_kernels.enable(tiny_sd_controlnet(), gate_step=2)(**_sd_call(image=tiny_image())())
    assert _diff(result, negative) > 1e-4


def test_attention_that_adds_its_own_residual_is_refused():
    """DeepFloyd IF-style UNets: their AttnAddedKV attention returns output + residual."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, norm_num_groups=32,
        attention_head_dim=8,
    )
    assert any(getattr(m, "is_cross_attention", False) for m in unet.modules())
    pipe = types.SimpleNamespace(unet=unet)
    with pytest.raises(ValueError, match="adds its own residual"):
        tgate_kernels.enable(pipe)
    assert not hasattr(unet, "_diffusers_hook")


def test_a_pipeline_sharing_an_enabled_denoiser_gets_a_clear_error():
    from diffusers import StableDiffusionPipeline

    pipe = tgate_kernels.enable(tiny_sd())
    sibling = StableDiffusionPipeline(**pipe.components)
    with pytest.raises(ValueError, match=r"shares its UNet2DConditionModel \(`unet`\) with another pipeline"):
        tgate_kernels.enable(sibling)
    assert "tgate" not in sibling.__dict__ and tgate_kernels.view(sibling) is None
    tgate_kernels.disable(pipe)
    tgate_kernels.enable(sibling)
    assert tgate_kernels.is_enabled(sibling)


def test_fast_path_steps_aside_under_autocast_and_for_offloaded_weights():
    call = _sd_call()
    expected = tgate_kernels.enable(tiny_sd(), gate_step=3, kernels="off")
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_off = expected(**call()).images
        autocast_on = pipe(**call()).images
    assert np.array_equal(autocast_on, autocast_off)

    from accelerate import cpu_offload

    offloaded = tgate_kernels.enable(tiny_sd(), gate_step=3)
    cpu_offload(offloaded.unet, execution_device="cpu")
    assert any(b.norm3.weight.device.type == "meta" for b in tgate_kernels.view(offloaded).fast_blocks)
    assert _diff(offloaded(**call()), expected(**call())) == 0.0


def test_disable_keeps_a_diffusers_hook_registered_after_ours_running():
    from diffusers.hooks import HookRegistry, ModelHook

    class CountingHook(ModelHook):
        calls = 0

        def new_forward(self, module, *args, **kwargs):
            CountingHook.calls += 1
            return self.fn_ref.original_forward(*args, **kwargs)

    baseline = tiny_sd()(**_sd_call()())
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    attention = tgate_kernels.view(pipe).attentions[0].module
    HookRegistry.check_if_exists_or_initialize(attention).register_hook(CountingHook(), "counting")
    tgate_kernels.disable(pipe)
    assert list(attention._diffusers_hook.hooks) == ["counting"]
    assert _diff(pipe(**_sd_call()()), baseline) == 0.0
    assert CountingHook.calls == 6, "the hook still runs: once per denoiser call"
