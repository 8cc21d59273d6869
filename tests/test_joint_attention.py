"""T-GATE on joint-attention transformers (SD3's MMDiT, FLUX's double- and single-stream
blocks, Qwen-Image's): after the gate the text stream is frozen (its modules give what they
cached at the gate, as the mean over the guidance parts; a single-stream block runs on its image
rows alone, beside the text rows it had at the gate) and classifier-free guidance is dropped. The
family-matrix tests (test_families.py) run on these families too; these check what is particular
to the text stream."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tgate_kernels
from tgate_kernels.engine.attention_modules import AttentionKind
from fixtures.families import FAMILIES
from fixtures.families_image import qwenimage_edit_components

STEPS, GATE = 4, 2
SD3 = FAMILIES["sd3"]
FLUX = FAMILIES["flux"]
JOINT = ["sd3", "flux", "flux2-klein", "qwenimage", "chroma", "aura-flow", "cogvideox", "hunyuan-video", "lumina2", "hidream"]


def _latents(pipe, steps=STEPS, family=SD3, **changes):
    with torch.no_grad():
        output = pipe(**{**family.call_kwargs(steps), **changes})
    return output.frames if hasattr(output, "frames") else output.images


def test_the_text_stream_of_every_dual_stream_block_is_hooked_and_the_joint_attention_scheduled_as_self_attention():
    pipe = tgate_kernels.enable(SD3.build())
    attentions = tgate_kernels.view(pipe).attentions
    text = sorted(a.name for a in attentions if a.kind is AttentionKind.TEXT)
    blocks = pipe.transformer.transformer_blocks
    expected = []
    for index, block in enumerate(blocks):
        names = ["add_q_proj", "add_k_proj", "add_v_proj"] + (["to_add_out"] if block.attn.to_add_out is not None else [])
        expected += [f"transformer_blocks.{index}.attn.{name}" for name in names]
        if getattr(block, "ff_context", None) is not None:
            expected.append(f"transformer_blocks.{index}.ff_context")
    assert text == sorted(expected)
    assert blocks[-1].context_pre_only and f"transformer_blocks.{len(blocks) - 1}.ff_context" not in text
    joint = sorted(a.name for a in attentions if a.kind is AttentionKind.JOINT)
    assert joint == [f"transformer_blocks.{index}.attn" for index in range(len(blocks))]


@pytest.mark.parametrize("name", JOINT)
def test_the_joint_attention_follows_the_self_attention_schedule_before_the_gate(name):
    """sp_interval=3, warm_up=1, gate at the 7th of 7 steps: every joint attention (of dual- and
    single-stream blocks) computes at steps 0, 1, 3 and 6 and gives at steps 2, 4 and 5 exactly
    what it gave at the last caching step, its projections not running."""
    family = FAMILIES[name]
    steps = 7
    pipe = tgate_kernels.enable(family.build(), gate_step=steps, sp_interval=3, warm_up=1, **family.settings)
    joint = [a for a in tgate_kernels.view(pipe).attentions if a.kind is AttentionKind.JOINT]
    assert joint, "every joint-attention family has a joint attention"
    denoiser = pipe.transformer
    calls = []
    outputs = {a.name: [] for a in joint}
    runs = {a.name: [] for a in joint}
    watches = [denoiser.register_forward_pre_hook(lambda module, args: calls.append(len(calls)))]
    for attention in joint:
        projection = next(m for m in attention.module.modules() if isinstance(m, torch.nn.Linear))
        watches.append(projection.register_forward_pre_hook(lambda module, args, name=attention.name: runs[name].append(calls[-1])))
        watches.append(attention.module.register_forward_hook(
            lambda module, args, output, name=attention.name: outputs[name].append(
                tuple(o.clone() for o in (output if isinstance(output, tuple) else (output,))))
        ))
    try:
        _latents(pipe, steps=steps, family=family)
    finally:
        for watch in watches:
            watch.remove()
    per_step = len(calls) // steps
    assert per_step * steps == len(calls)
    for name in outputs:
        assert sorted({call // per_step for call in runs[name]}) == [0, 1, 3, 6], name
        by_step = [outputs[name][step * per_step:(step + 1) * per_step] for step in range(steps)]
        for reusing, cached_at in ((2, 1), (4, 3), (5, 3)):
            for reused, cached in zip(by_step[reusing], by_step[cached_at]):
                assert all(torch.equal(r, c) for r, c in zip(reused, cached)), (name, reusing)
        assert not all(torch.equal(a, b) for a, b in zip(by_step[3][0], by_step[1][0])), name


@pytest.mark.parametrize("name", JOINT)
def test_with_the_gate_never_reached_the_output_is_the_plain_pipelines(name):
    family = FAMILIES[name]
    plain = _latents(family.build(), family=family)
    pipe = tgate_kernels.enable(family.build(), gate_step=STEPS, sp_interval=1, warm_up=0, **family.settings)
    assert torch.equal(_latents(pipe, family=family), plain)


def test_after_the_gate_the_image_attends_to_the_text_keys_and_values_of_the_gate_step():
    pipe = tgate_kernels.enable(SD3.build(), gate_step=GATE)
    keys = []
    attn = pipe.transformer.transformer_blocks[0].attn
    # what the joint attention gets from the text stream: its key projection's output, each step
    attn.add_k_proj.register_forward_hook(lambda module, args, output: keys.append(output.detach().clone()))
    _latents(pipe)
    negative, prompt = keys[GATE - 1].chunk(2)
    for step in range(GATE, STEPS):
        assert torch.equal(keys[step], (negative + prompt) / 2), step


def _step_flops(pipe, step, family=SD3, **changes):
    """FLOPs of one denoising step (its transformer calls and the scheduler's update)."""
    return _step_counter(pipe, step, family, **changes).get_total_flops()


def _step_counter(pipe, step, family=SD3, **changes) -> FlopCounterMode:
    """The FLOP counter of one denoising step, by module."""
    counter = FlopCounterMode(display=False)

    def around_step(pipe_, index, timestep, callback_kwargs):
        if index == step - 1:
            counter.__enter__()
        elif index == step:
            counter.__exit__(None, None, None)
        return callback_kwargs

    with torch.no_grad():
        pipe(**{**family.call_kwargs(STEPS), **changes}, callback_on_step_end=around_step)
    return counter


@pytest.mark.parametrize("name", JOINT)
def test_after_the_gate_a_step_costs_less_than_dropping_guidance_alone(name):
    family = FAMILIES[name]
    plain = _step_flops(family.build(), GATE, family)
    gated = _step_flops(tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0, **family.settings), GATE, family)
    assert 0 < gated < plain / 2, (gated, plain)


def test_without_guidance_the_frozen_text_stream_alone_saves():
    """FLUX.1-dev is guidance-distilled (one call a step): only the text stream's work is saved."""
    unguided = {"negative_prompt": None, "true_cfg_scale": 1.0}
    plain = _step_flops(FLUX.build(), GATE, FLUX, **unguided)
    gated = _step_flops(tgate_kernels.enable(FLUX.build(), gate_step=GATE, sp_interval=1, warm_up=0), GATE, FLUX, **unguided)
    assert 0 < gated < plain, (gated, plain)


@pytest.mark.parametrize("name", JOINT)
def test_compile_gives_eager_t_gates_latents(name):
    """With the joint attention reused before the gate (steps 1 and 3) and after it (step 5), as
    one guided batch or as one call per guidance part (each part reusing its own)."""
    family = FAMILIES[name]
    torch._dynamo.reset()
    schedule = dict(gate_step=5, sp_interval=2, warm_up=0, fi_interval=2, **family.settings)
    eager = _latents(tgate_kernels.enable(family.build(), **schedule, kernels="off"), steps=6, family=family)
    compiled = _latents(tgate_kernels.enable(family.build(), **schedule, compile={"backend": "eager"}), steps=6, family=family)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, steps, schedule",
    [
        ("flux", STEPS, dict(gate_step=GATE)),
        ("hunyuan-video", STEPS, dict(gate_step=GATE)),
        ("flux", 6, dict(gate_step=5, sp_interval=2, warm_up=0, fi_interval=2)),
    ],
)
def test_inductor_with_freezing_gives_eager_t_gates_latents_through_single_stream_blocks(name, steps, schedule):
    """FLUX's single-stream blocks run on the image rows; HunyuanVideo's keep the text rows in place.
    With the joint attention reused before the gate (steps 1, 3) and after it (step 5), FLUX's two
    calls a step (true CFG) each reuse their own."""
    family = FAMILIES[name]
    torch._dynamo.reset()
    eager = _latents(tgate_kernels.enable(family.build(), **schedule, kernels="off"), steps=steps, family=family)
    pipe = tgate_kernels.enable(family.build(), **schedule, compile=True)
    for _ in range(2):
        torch.testing.assert_close(_latents(pipe, steps=steps, family=family), eager, rtol=1e-4, atol=1e-5)


def _rows_seen(pipe, family, **changes):
    """Per call of the first single-stream block: the rows its feed-forward input had, and its
    key projection's output as the attention got it."""
    block = pipe.transformer.single_transformer_blocks[0]
    mlp_rows, keys, text_outputs = [], [], []
    block.proj_mlp.register_forward_hook(lambda m, args, out: mlp_rows.append(args[0].shape[1]))
    block.attn.to_k.register_forward_hook(lambda m, args, out: keys.append(out.detach().clone()))
    block.register_forward_hook(lambda m, args, out: text_outputs.append(out[0].detach().clone()))
    _latents(pipe, family=family, **changes)
    return mlp_rows, keys, text_outputs


def test_a_single_stream_block_runs_on_its_image_rows_beside_the_gate_steps_text_rows():
    pipe = tgate_kernels.enable(FLUX.build(), gate_step=GATE, sp_interval=1, warm_up=0)
    mlp_rows, keys, text_outputs = _rows_seen(pipe, FLUX)
    layout = tgate_kernels.view(pipe).last_generation.layout
    per_step = len(layout.parts)
    assert per_step == 2  # true CFG: a call for the prompt, one for the negative prompt
    text_rows = keys[0].shape[1] - mlp_rows[-1]
    assert text_rows > 0 and all(rows == text_rows + mlp_rows[-1] for rows in mlp_rows[: per_step * GATE])
    calls_after = len(mlp_rows) - per_step * GATE
    assert calls_after == STEPS - GATE, "one call a step after the gate"
    at_gate = keys[per_step * (GATE - 1): per_step * GATE]
    expected_keys = (at_gate[0][:, :text_rows] + at_gate[1][:, :text_rows]) / 2
    gate_text = text_outputs[per_step * (GATE - 1): per_step * GATE]
    for call in range(per_step * GATE, len(mlp_rows)):
        assert mlp_rows[call] == mlp_rows[-1], "after the gate the shared layers see no text row"
        assert torch.equal(keys[call][:, :text_rows], expected_keys)
        assert torch.equal(text_outputs[call], (gate_text[0] + gate_text[1]) / 2)


# single-stream blocks taking one joined sequence: the text rows first (Chroma's, AuraFlow's,
# FLUX.2's) or last (HiDream's)
JOINED = {
    "chroma": "single_transformer_blocks.0", "aura-flow": "single_transformer_blocks.0",
    "flux2-klein": "single_transformer_blocks.0", "hidream": "single_stream_blocks.0.block",
}


@pytest.mark.parametrize("name", sorted(JOINED))
def test_a_single_stream_block_on_a_joined_sequence_keeps_the_gate_steps_text_rows(name):
    """Chroma's, AuraFlow's, FLUX.2's and HiDream's single-stream blocks take the text and image
    rows joined: after the gate they get the image rows alone, and give back the gate step's text
    rows beside them."""
    from tgate_kernels.families.registry import single_stream_layout

    family = FAMILIES[name]
    pipe = tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0)
    block = pipe.transformer.get_submodule(JOINED[name])
    layout = single_stream_layout(block)
    # the rows the block's layers run on, and the text rows the attention gets: its last
    # projection's input and output (FLUX.2's one fused projection of q, k, v and the MLP input)
    projection = getattr(getattr(block, layout.attention), layout.projections[-1])
    inputs, keys, outputs = [], [], []
    projection.register_forward_hook(lambda m, args, out: inputs.append(args[0].shape[1]))
    block.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    projection.register_forward_hook(lambda m, args, out: keys.append(out.detach().clone()))
    _latents(pipe, family=family)
    rows = outputs[0].shape[1]
    text_rows = rows - inputs[-1]
    text_of = (lambda t: t[:, :text_rows]) if layout.text_first else (lambda t: t[:, rows - text_rows:])
    assert 0 < text_rows < rows and all(count == rows for count in inputs[: len(inputs) - (STEPS - GATE)])
    after = range(len(inputs) - (STEPS - GATE), len(inputs))
    gate_calls = [i for i in range(len(inputs)) if i < after[0]][-2:]
    layout = tgate_kernels.view(pipe).last_generation.layout
    if layout.mode.value == "batched":  # one call, [negative, prompt] halves
        negative, prompt = outputs[after[0] - 1].chunk(2)
        negative_keys, prompt_keys = keys[after[0] - 1].chunk(2)
    else:
        (negative, prompt), (negative_keys, prompt_keys) = [outputs[i] for i in gate_calls], [keys[i] for i in gate_calls]
    for call in after:
        assert inputs[call] == rows - text_rows, "after the gate the block takes the image rows alone"
        assert outputs[call].shape[1] == rows
        torch.testing.assert_close(text_of(outputs[call]), (text_of(negative) + text_of(prompt)) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(text_of(keys[call]), (text_of(negative_keys) + text_of(prompt_keys)) / 2, rtol=0, atol=1e-6)


# blocks that cut their sequence by the text rows' count, so they keep their text rows after the gate
KEEPS_TEXT_ROWS = {"cogvideox": "transformer_blocks.0", "hunyuan-video": "single_transformer_blocks.0"}


@pytest.mark.parametrize("name", sorted(KEEPS_TEXT_ROWS))
def test_a_block_cutting_its_sequence_by_the_text_rows_computes_its_image_rows_beside_the_gate_steps_text(name):
    import inspect

    from tgate_kernels.families.registry import single_stream_layout

    family = FAMILIES[name]
    path = KEEPS_TEXT_ROWS[name]
    pipe = tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0)
    block = pipe.transformer.get_submodule(path)
    layout = single_stream_layout(block)
    assert layout is not None and layout.keeps_text_rows
    signature = inspect.signature(block.forward)
    keys, text_outputs, text_rows = [], [], []
    block.register_forward_pre_hook(
        lambda m, args, kwargs: text_rows.append(signature.bind(*args, **kwargs).arguments["encoder_hidden_states"].shape[1]),
        with_kwargs=True,
    )
    getattr(block, layout.attention).to_k.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
    block.register_forward_hook(lambda m, a, out: text_outputs.append(out[0 if layout.returns_text_first else 1].detach().clone()))
    _latents(pipe, family=family)
    count = text_rows[0]
    text_of = (lambda rows: rows[:, :count]) if layout.text_first else (lambda rows: rows[:, -count:])
    batched = tgate_kernels.view(pipe).last_generation.layout.mode.value == "batched"
    before = GATE if batched else 2 * GATE
    assert len(keys) == before + STEPS - GATE, "one call a step after the gate"
    if batched:
        (negative_keys, prompt_keys), (negative, prompt) = keys[before - 1].chunk(2), text_outputs[before - 1].chunk(2)
    else:
        negative_keys, prompt_keys = keys[before - 2: before]
        negative, prompt = text_outputs[before - 2: before]
    for call in range(before, len(keys)):
        assert keys[call].shape[1] == keys[0].shape[1], "the block still sees its text rows"
        torch.testing.assert_close(text_of(keys[call]), (text_of(negative_keys) + text_of(prompt_keys)) / 2, rtol=0, atol=1e-6)
        torch.testing.assert_close(text_outputs[call], (negative + prompt) / 2, rtol=0, atol=1e-6)
        assert not torch.equal(keys[call], keys[call - 1]), "the image rows are computed"

    # each row-wise module and projection works on the image rows alone after the gate: per
    # image, its FLOPs shrink by the text rows' share
    rows = keys[0].shape[1]
    at_gate = _step_counter(family.build(), GATE, family).get_flop_counts()
    after = _step_counter(tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0), GATE, family).get_flop_counts()
    prefix = f"{type(pipe.transformer).__name__}.{path}."
    for module in [*layout.row_modules, *(f"{layout.attention}.{p}" for p in layout.projections)]:
        plain, gated = sum(at_gate[prefix + module].values()), sum(after[prefix + module].values())
        assert gated * 2 * rows == plain * (rows - count), module


def test_without_a_negative_prompt_the_single_stream_text_rows_are_the_gate_steps():
    unguided = {"negative_prompt": None, "true_cfg_scale": 1.0}
    pipe = tgate_kernels.enable(FLUX.build(), gate_step=GATE, sp_interval=1, warm_up=0)
    mlp_rows, keys, text_outputs = _rows_seen(pipe, FLUX, **unguided)
    image_rows = mlp_rows[-1]
    text_rows = keys[0].shape[1] - image_rows
    assert mlp_rows[:GATE] == [text_rows + image_rows] * GATE and mlp_rows[GATE:] == [image_rows] * (STEPS - GATE)
    for step in range(GATE, STEPS):
        assert torch.equal(keys[step][:, :text_rows], keys[GATE - 1][:, :text_rows])
        assert torch.equal(text_outputs[step], text_outputs[GATE - 1])
    assert not torch.equal(keys[GATE][:, text_rows:], keys[GATE - 1][:, text_rows:]), "the image rows are computed"


def _flux_dev():
    """FLUX.1-dev's shape: the transformer takes the guidance scale as an input (guidance-distilled)."""
    pipe = FLUX.build()
    torch.manual_seed(0)
    pipe.transformer = type(pipe.transformer).from_config({**pipe.transformer.config, "guidance_embeds": True})
    return pipe


def test_flux_with_a_guidance_embedding_is_gated():
    unguided = {"negative_prompt": None, "true_cfg_scale": 1.0, "guidance_scale": 3.5}
    plain = _latents(_flux_dev(), family=FLUX, **unguided)
    pipe = tgate_kernels.enable(_flux_dev(), gate_step=STEPS, sp_interval=1, warm_up=0)
    assert torch.equal(_latents(pipe, family=FLUX, **unguided), plain)
    tgate_kernels.enable(pipe, gate_step=GATE)
    assert _step_flops(pipe, GATE, FLUX, **unguided) < _step_flops(_flux_dev(), GATE, FLUX, **unguided)


@pytest.mark.parametrize("reference_image", [False, True], ids=["text-to-image", "with-a-reference-image"])
def test_flux2_dev_guidance_distilled_is_gated_on_its_text_stream_alone(reference_image):
    """FLUX.2 [dev] runs one call a step (its guidance scale is an input of the transformer): after
    the gate its text stream is frozen and nothing else changes; a reference image's tokens stay in
    the image stream."""
    from fixtures.families_image import tiny_flux2_dev

    call = dict(
        prompt="a tiny red fox", num_inference_steps=STEPS, height=32, width=32, guidance_scale=4.0,
        max_sequence_length=32, text_encoder_out_layers=(1,), output_type="latent",
    ) | (dict(image=_pil_image().resize((64, 64))) if reference_image else {})  # its least size

    def run(pipe):
        with torch.no_grad():
            return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    family = SimpleNamespace(call_kwargs=lambda steps: call | {"generator": torch.Generator().manual_seed(0)})

    plain = run(tiny_flux2_dev())
    pipe = tgate_kernels.enable(tiny_flux2_dev(), gate_step=STEPS, sp_interval=1, warm_up=0)
    assert torch.equal(run(pipe), plain)
    tgate_kernels.enable(pipe, gate_step=GATE, sp_interval=1, warm_up=0)
    gated = run(pipe)
    assert gated.shape == plain.shape and not torch.equal(gated, plain)
    assert {a.name for a in tgate_kernels.view(pipe).attentions if a.kind is AttentionKind.TEXT} >= {
        "transformer_blocks.0.ff_context", "single_transformer_blocks.0",
    }
    assert 0 < _step_flops(pipe, GATE, family) < _step_flops(tiny_flux2_dev(), GATE, family)
    tgate_kernels.disable(pipe)
    assert torch.equal(run(pipe), plain)


def test_qwen_image_freezes_the_text_feed_forward_too():
    pipe = tgate_kernels.enable(FAMILIES["qwenimage"].build())
    text = {a.name for a in tgate_kernels.view(pipe).attentions if a.kind is AttentionKind.TEXT}
    assert {f"transformer_blocks.{i}.txt_mlp" for i in range(len(pipe.transformer.transformer_blocks))} <= text


def _image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _pil_image(flipped=False):
    from PIL import Image

    pixels = (_image()[0].permute(1, 2, 0) * 255).to(torch.uint8)
    return Image.fromarray((pixels.flip(1) if flipped else pixels).numpy())


def _sd3_components_of_16_latent_channels():
    from fixtures.families_image import _flow_vae

    components = SD3.build().components
    config = {**components["transformer"].config, "in_channels": 16, "out_channels": 16}
    config.pop("_use_default_values", None)
    torch.manual_seed(0)
    components["transformer"] = type(components["transformer"]).from_config(config)
    components["vae"] = _flow_vae(0, levels=2, latent_channels=16)
    return components


def _flux_components(in_channels=None):
    """The tiny FLUX's components; ``in_channels``: a transformer taking the control or fill
    channels beside the latents (Control, Fill)."""
    components = FLUX.build().components
    if in_channels is not None:
        config = {**components["transformer"].config, "in_channels": in_channels, "out_channels": 16}
        config.pop("_use_default_values", None)
        torch.manual_seed(0)
        components["transformer"] = type(components["transformer"]).from_config(config)
        del components["image_encoder"], components["feature_extractor"]
    return components


def _flux_controlnet_components():
    import diffusers

    components = FLUX.build().components
    config = components["transformer"].config
    torch.manual_seed(0)
    components["controlnet"] = diffusers.FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
        axes_dims_rope=(4, 4, 8),
    )
    return components




QWEN = FAMILIES["qwenimage"]


def _sd3_controlnet_components(**options):
    import diffusers

    components = SD3.build().components
    config = components["transformer"].config
    torch.manual_seed(0)
    components["controlnet"] = diffusers.SD3ControlNetModel(
        sample_size=config.sample_size, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim, out_channels=4, **options,
    )
    # diffusers starts a ControlNet's output layers at zero; random ones make its effect visible
    for block in components["controlnet"].controlnet_blocks:
        torch.nn.init.normal_(block.weight, std=0.1)
    return components


def _qwen_controlnet_components(**options):
    import diffusers

    components = QWEN.build().components
    config = components["transformer"].config
    torch.manual_seed(0)
    components["controlnet"] = diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=config.in_channels, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=config.joint_attention_dim, axes_dims_rope=(8, 4, 4), **options,
    )
    for block in components["controlnet"].controlnet_blocks:
        torch.nn.init.normal_(block.weight, std=0.1)
    return components


CHROMA = FAMILIES["chroma"]
HUNYUAN_VIDEO = FAMILIES["hunyuan-video"]
COGVIDEOX = FAMILIES["cogvideox"]


def _hunyuan_video_image_components():
    """The tiny HunyuanVideo's, its transformer reading the image latents beside the latents."""
    components = HUNYUAN_VIDEO.build().components
    config = {**components["transformer"].config, "in_channels": 8}
    config.pop("_use_default_values", None)
    torch.manual_seed(0)
    components["transformer"] = type(components["transformer"]).from_config(config)
    return components


def _cogvideox_components(pipeline, in_channels=4):
    from fixtures.families_video import tiny_cogvideox

    return lambda: tiny_cogvideox(pipeline=pipeline, in_channels=in_channels, use_learned_positional_embeddings=False).components


def _frames(count=8):
    return [_pil_image()] * count

VARIANTS = {
    "StableDiffusion3Img2ImgPipeline": (SD3, lambda: SD3.build().components, dict(image=_image(), strength=0.9)),
    # its inpainting takes 16 latent channels (or 33 with the mask and masked image's)
    "StableDiffusion3InpaintPipeline": (
        SD3, _sd3_components_of_16_latent_channels, dict(image=_image(), mask_image=torch.ones(1, 1, 32, 32), strength=0.9),
    ),
    "ChromaImg2ImgPipeline": (CHROMA, lambda: CHROMA.build().components, dict(image=_image(), strength=0.9)),
    "StableDiffusion3ControlNetPipeline": (SD3, _sd3_controlnet_components, dict(control_image=_image())),
    "StableDiffusion3ControlNetInpaintingPipeline": (
        SD3, lambda: _sd3_controlnet_components(extra_conditioning_channels=1),
        dict(control_image=_image(), control_mask=torch.ones(1, 1, 32, 32)),
    ),
    "QwenImageImg2ImgPipeline": (QWEN, lambda: QWEN.build().components, dict(image=_image(), strength=0.9)),
    "QwenImageInpaintPipeline": (
        QWEN, lambda: QWEN.build().components, dict(image=_image(), mask_image=torch.ones(1, 1, 32, 32), strength=0.9),
    ),
    "QwenImageControlNetPipeline": (QWEN, _qwen_controlnet_components, dict(control_image=_image())),
    # the masked image's 4 latent channels and the mask's, packed 2 x 2, beside the latents'
    "QwenImageControlNetInpaintPipeline": (
        QWEN, lambda: _qwen_controlnet_components(extra_condition_channels=4),
        dict(control_image=_image(), control_mask=torch.ones(1, 1, 32, 32)),
    ),
    # the condition image as a PIL image: the pipelines read its size (a 64 x 64 output from it)
    "QwenImageEditPipeline": (QWEN, qwenimage_edit_components, dict(image=_pil_image(), height=64, width=64)),
    "QwenImageEditPlusPipeline": (
        QWEN, qwenimage_edit_components, dict(image=[_pil_image(), _pil_image(flipped=True)], height=64, width=64),
    ),
    "QwenImageEditInpaintPipeline": (
        QWEN, qwenimage_edit_components,
        dict(image=_pil_image(), mask_image=torch.ones(1, 1, 64, 64), height=64, width=64, strength=0.9),
    ),
    "FluxImg2ImgPipeline": (FLUX, _flux_components, dict(image=_image(), strength=0.9)),
    "FluxInpaintPipeline": (FLUX, _flux_components, dict(image=_image(), mask_image=torch.ones(1, 1, 32, 32), strength=0.9)),
    "FluxKontextPipeline": (FLUX, _flux_components, dict(image=_image(), _auto_resize=False, max_area=32 * 32)),
    # 4 latent channels packed 2x2: 16 of latents, 16 of the control image's
    "FluxControlPipeline": (FLUX, lambda: _flux_components(32), dict(control_image=_image())),
    # ... 16 of the masked image's and 16 of the mask's (a factor-2 VAE)
    "FluxFillPipeline": (FLUX, lambda: _flux_components(48), dict(image=_image(), mask_image=torch.ones(1, 1, 32, 32))),
    "FluxControlNetPipeline": (FLUX, _flux_controlnet_components, dict(control_image=_image())),
    "Flux2KleinInpaintPipeline": (
        FAMILIES["flux2-klein"], lambda: FAMILIES["flux2-klein"].build().components,
        dict(image=_image(), mask_image=torch.ones(1, 1, 32, 32), strength=0.9),
    ),
    "HunyuanSkyreelsImageToVideoPipeline": (HUNYUAN_VIDEO, _hunyuan_video_image_components, dict(image=_image()[..., :16, :16])),
    "CogVideoXImageToVideoPipeline": (
        COGVIDEOX, _cogvideox_components("CogVideoXImageToVideoPipeline", in_channels=8), dict(image=_frames(1)[0]),
    ),
    "CogVideoXVideoToVideoPipeline": (
        COGVIDEOX, _cogvideox_components("CogVideoXVideoToVideoPipeline"), dict(video=_frames(), strength=0.9),
    ),
    "CogVideoXFunControlPipeline": (
        COGVIDEOX, _cogvideox_components("CogVideoXFunControlPipeline", in_channels=8), dict(control_video=_frames()),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_is_gated_and_disable_restores_it(variant):
    import inspect

    import diffusers

    family, components, inputs = VARIANTS[variant]
    pipeline = getattr(diffusers, variant)

    def build():
        return pipeline(**components())

    accepted = inspect.signature(pipeline.__call__).parameters
    steps = 6  # img2img and inpaint run the last `strength` of them
    call = {name: value for name, value in family.call_kwargs(steps).items() if name in accepted} | inputs

    def run(pipe):
        with torch.no_grad():
            output = pipe(**{**call, "generator": torch.Generator().manual_seed(0)})
        return output.frames if hasattr(output, "frames") else output.images

    plain = run(build())
    pipe = tgate_kernels.enable(build(), gate_step=steps, sp_interval=1, warm_up=0)
    assert torch.equal(run(pipe), plain)
    tgate_kernels.enable(pipe, gate_step=GATE)
    gated = run(pipe)
    assert gated.shape == plain.shape and not torch.equal(gated, plain)
    frozen = [a for a in tgate_kernels.view(pipe).attentions if a.kind is AttentionKind.TEXT]
    assert {a.denoiser for a in frozen} == ({"transformer", "controlnet"} if "controlnet" in pipe.components else {"transformer"})
    tgate_kernels.disable(pipe)
    assert torch.equal(run(pipe), plain)


def _refused_joint_pipelines():
    from tgate_kernels.families.registry import Conditioning, registered_families

    return sorted(name for family in registered_families() if family.refused
                  and family.conditioning is Conditioning.JOINT_ATTENTION for name in family.pipelines)


@pytest.mark.parametrize("pipeline", _refused_joint_pipelines())
def test_joint_attention_families_not_done_are_refused_by_name_with_the_reason(pipeline):
    """A subclass of the named pipeline class (found along the MRO, as a user's would be)."""
    base = type(pipeline, (), {"progress_bar": lambda self, **kwargs: None})
    pipe = type(f"My{pipeline}", (base,), {})()
    pipe.transformer = SD3.build().transformer
    with pytest.raises(ValueError, match=f"My{pipeline}: joint attention .*T-GATE (does not|gates one|has not)"):
        tgate_kernels.enable(pipe)
    assert "_diffusers_hook" not in pipe.transformer.__dict__


def test_projections_fused_after_enable_are_refused_at_the_gate_with_what_to_do():
    pipe = tgate_kernels.enable(FLUX.build(), gate_step=GATE)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match=r"single_transformer_blocks\.0`: the projections \['to_q', 'to_k', 'to_v'\].*enable it again"):
        _latents(pipe, family=FLUX)
    pipe.transformer.unfuse_qkv_projections()
    plain = _latents(FLUX.build(), family=FLUX)
    tgate_kernels.enable(pipe, gate_step=STEPS, sp_interval=1, warm_up=0)
    assert torch.equal(_latents(pipe, family=FLUX), plain)


@pytest.mark.parametrize("name", ["sd", "sd3", "flux"])
def test_compile_caches_the_kept_parts_own_output_at_the_gate_as_eager_does(name):
    """``gate_cache="kept-part"`` under compile (the plan as data): one guided batch (SD, SD3) or
    one call per part (FLUX's true CFG)."""
    family = FAMILIES[name]
    torch._dynamo.reset()
    settings = dict(gate_step=GATE, gate_cache="kept-part")
    eager = _latents(tgate_kernels.enable(family.build(), **settings, kernels="off"), family=family)
    mean = _latents(tgate_kernels.enable(family.build(), gate_step=GATE, kernels="off"), family=family)
    compiled = _latents(tgate_kernels.enable(family.build(), **settings, compile={"backend": "eager"}), family=family)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (torch.as_tensor(eager) - torch.as_tensor(mean)).abs().max() > 1e-4


MOCHI_OWN = dict(kept_part="conditional", gate_cache="kept-part")


def test_mochi_is_refused_unless_the_prompts_part_keeps_its_own_text_stream():
    """Mochi's attention picks each sample's text tokens by that sample's mask: after the gate
    the prompt's part must run with the text stream it cached itself, not the mean."""
    from fixtures.families_video import tiny_mochi

    pipe = tiny_mochi()
    for settings in ({}, {"kept_part": "conditional"}, {"gate_cache": "kept-part"}):
        with pytest.raises(ValueError, match="MochiPipeline needs kept_part='conditional' and gate_cache='kept-part'"):
            tgate_kernels.enable(pipe, gate_step=GATE, **settings)
        assert not tgate_kernels.is_enabled(pipe)
        assert not any("forward" in module.__dict__ for module in pipe.transformer.modules())
    # a loader on a pipeline never enabled has the reference's settings: refused
    with pytest.raises(ValueError, match="MochiPipeline needs"):
        tgate_kernels.TgateSDLoader(pipe)
    assert not tgate_kernels.is_enabled(pipe)
    # enabled with them, the loader keeps the pipeline's own
    tgate_kernels.enable(pipe, gate_step=GATE, **MOCHI_OWN)
    tgate_kernels.TgateSDLoader(pipe, gate_step=GATE)
    assert tgate_kernels.view(pipe).tgate_config.gate_cache.value == "kept-part"


def test_mochi_with_the_prompts_own_text_stream_is_gated_correctly():
    from fixtures.families_video import mochi_call, tiny_mochi

    def run(pipe, steps=STEPS, **changes):
        with torch.no_grad():
            return pipe(**{**mochi_call(steps), **changes}).frames

    plain = run(tiny_mochi())
    never = tgate_kernels.enable(tiny_mochi(), gate_step=STEPS, sp_interval=1, warm_up=0, **MOCHI_OWN)
    assert torch.equal(run(never), plain)
    # gate 0: nothing cached, guidance dropped: the unguided run of the prompt with its own mask
    unguided = run(tiny_mochi(), guidance_scale=1.0)
    at_zero = tgate_kernels.enable(tiny_mochi(), gate_step=0, **MOCHI_OWN)
    torch.testing.assert_close(run(at_zero), unguided, rtol=1e-5, atol=1e-5)
    pipe = tgate_kernels.enable(tiny_mochi(), gate_step=GATE, sp_interval=1, warm_up=0, **MOCHI_OWN)
    with tgate_kernels.view(pipe).record() as record:
        gated = run(pipe)
    assert record.computed(GATE, cross=True) == 0 and record.reused(GATE, cross=True) > 0
    assert record.rows_run(GATE) == [1]
    assert not torch.equal(gated, plain) and torch.isfinite(gated).all()
    torch._dynamo.reset()
    compiled = tgate_kernels.enable(tiny_mochi(), gate_step=GATE, sp_interval=1, warm_up=0, compile={"backend": "eager"}, **MOCHI_OWN)
    torch.testing.assert_close(run(compiled), gated, rtol=1e-5, atol=1e-5)


LUMINA2 = FAMILIES["lumina2"]


def test_lumina2_freezes_each_layers_text_rows_and_its_text_refiner_after_the_gate():
    """Lumina 2's layers take each sample's text rows joined before its image rows: after the gate
    a layer's keys and output keep the prompt call's text rows of the gate step, its row-wise
    modules compute the image rows alone, and its text refiner does not run."""
    pipe = tgate_kernels.enable(LUMINA2.build(), gate_step=GATE, sp_interval=1, warm_up=0, **LUMINA2.settings)
    transformer = pipe.transformer
    layer = transformer.layers[0]
    refiner_runs, counts, keys, outputs = [], [], [], []
    transformer.context_refiner[0].attn.to_q.register_forward_hook(lambda m, a, out: refiner_runs.append(1))
    transformer.rope_embedder.register_forward_hook(lambda m, a, out: counts.append(out[4]))
    layer.attn.to_k.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
    layer.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    _latents(pipe, family=LUMINA2)
    # two calls a step before the gate (prompt, then negative), the prompt's alone after it
    assert len(keys) == 2 * GATE + STEPS - GATE and len(refiner_runs) == 2 * GATE
    prompt_call = 2 * (GATE - 1)
    (text,) = set(counts[prompt_call])
    for call in range(2 * GATE, len(keys)):
        assert torch.equal(keys[call][:, :text], keys[prompt_call][:, :text])
        assert torch.equal(outputs[call][:, :text], outputs[prompt_call][:, :text])
        assert not torch.equal(keys[call][:, text:], keys[call - 1][:, text:]), "the image rows are computed"

    # the gate step's two calls ran over their own text rows and the image rows, the prompt's call
    # after the gate over the image rows alone
    image = keys[prompt_call].shape[1] - text
    rows = keys[prompt_call].shape[1] + keys[prompt_call + 1].shape[1]
    prefix = f"{type(transformer).__name__}.layers.0."
    at_gate = _step_counter(LUMINA2.build(), GATE, LUMINA2).get_flop_counts()
    after = _step_counter(
        tgate_kernels.enable(LUMINA2.build(), gate_step=GATE, sp_interval=1, warm_up=0, **LUMINA2.settings), GATE, LUMINA2,
    ).get_flop_counts()
    for module in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "feed_forward"):
        plain, gated = sum(at_gate[prefix + module].values()), sum(after[prefix + module].values())
        assert gated * rows == plain * image, module


def test_lumina2_texts_of_different_lengths_in_one_batch_give_each_prompt_its_own_image():
    """Each sample's text rows are its own count, its image rows after them and the padding after
    those: two prompts (and negative prompts) of different lengths in one call give what each
    gives alone from the same noise."""
    prompts, negatives = ["a tiny red fox", "a cat on a big green mat in the sun"], ["blurry", "low quality, blurry, dark"]
    pipe = tgate_kernels.enable(LUMINA2.build(), gate_step=GATE, sp_interval=2, warm_up=1, **LUMINA2.settings)
    lengths = [len(pipe.tokenizer(p).input_ids) for p in prompts + negatives]
    assert lengths[0] != lengths[1] and lengths[2] != lengths[3]
    call = {k: v for k, v in LUMINA2.call_kwargs(STEPS).items() if k not in ("prompt", "negative_prompt", "generator")}
    noise = torch.randn(2, pipe.transformer.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(pipe, *samples):
        with torch.no_grad():
            return pipe(
                prompt=[prompts[i] for i in samples], negative_prompt=[negatives[i] for i in samples],
                latents=noise[list(samples)], **call,
            ).images

    together = run(pipe, 0, 1)
    alone = torch.cat([run(pipe, 0), run(pipe, 1)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    assert (together - run(LUMINA2.build(), 0, 1)).abs().max() > 1e-3, "T-GATE changed the images"


def test_lumina2_under_compile_runs_eagerly_with_a_warning_and_gives_eager_t_gates_latents_every_time():
    """Lumina 2's transformer breaks the graph (it reads its text lengths to the host): the graphs
    after the break would read the caches of the generation they were traced in. It is not
    compiled; every generation gives eager T-GATE's latents."""
    schedule = dict(gate_step=GATE, sp_interval=1, warm_up=0, **LUMINA2.settings)
    eager = _latents(tgate_kernels.enable(LUMINA2.build(), **schedule), family=LUMINA2)
    torch._dynamo.reset()
    pipe = tgate_kernels.enable(LUMINA2.build(), **schedule, compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile of transformer failed .*T-GATE runs it eagerly instead"):
        first = _latents(pipe, family=LUMINA2)
    for latents in (first, _latents(pipe, family=LUMINA2)):
        torch.testing.assert_close(latents, eager, rtol=0, atol=1e-6)


def test_hidream_freezes_the_text_projections_and_feed_forward_of_its_dual_stream_blocks():
    """HiDream names its text stream's modules ``to_*_t`` and ``ff_t``; its guided Llama states
    carry the parts along their second dimension (one slice per layer first)."""
    family = FAMILIES["hidream"]
    pipe = tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0)
    attentions = tgate_kernels.view(pipe).attentions
    text = sorted(a.name for a in attentions if a.kind is AttentionKind.TEXT)
    double = "double_stream_blocks.0.block"
    assert text == sorted([f"{double}.attn1.to_{p}_t" for p in ("q", "k", "v", "out")] + [f"{double}.ff_t", "single_stream_blocks.0.block"])
    assert sorted(a.name for a in attentions if a.kind is AttentionKind.JOINT) == [f"{double}.attn1", "single_stream_blocks.0.block.attn1"]
    keys, llama = [], []
    pipe.transformer.get_submodule(double).attn1.to_k_t.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
    # the projection of the first Llama layer's states the transformer picked: the guided batch
    # before the gate, the kept part's rows after it
    pipe.transformer.caption_projection[0].register_forward_hook(lambda m, args, out: llama.append(args[0].shape[0]))
    _latents(pipe, family=family)
    negative, prompt = keys[GATE - 1].chunk(2)
    for step in range(GATE, STEPS):
        assert torch.equal(keys[step], (negative + prompt) / 2), step
    assert llama == [2] * GATE + [1] * (STEPS - GATE)


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("offload", ["model", "group"])
def test_offloading_in_either_order_keeps_every_call_gated(name, offload):
    """accelerate's model offloading (hooks re-applied after every call) and diffusers' group
    offloading of the transformer, set before or after ``enable``: every call gives what T-GATE
    gives without offloading, and ``disable`` gives the plain pipeline's."""
    family = FAMILIES[name]
    expected = _latents(tgate_kernels.enable(family.build(), gate_step=GATE), family=family)
    plain = _latents(family.build(), family=family)

    def offloaded(pipe):
        if offload == "model":
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            pipe.transformer.enable_group_offload(
                onload_device=torch.device("cpu"), offload_device=torch.device("cpu"), offload_type="block_level",
                num_blocks_per_group=1,
            )

    for order in ("offload-then-enable", "enable-then-offload"):
        pipe = family.build()
        if order == "enable-then-offload":
            tgate_kernels.enable(pipe, gate_step=GATE)
        offloaded(pipe)
        if order == "offload-then-enable":
            tgate_kernels.enable(pipe, gate_step=GATE)
        for call in range(2):
            assert torch.equal(_latents(pipe, family=family), expected), (order, call)
        tgate_kernels.disable(pipe)
        assert torch.equal(_latents(pipe, family=family), plain), order
