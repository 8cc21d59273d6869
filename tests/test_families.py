"""Every diffusers pipeline family with separate cross-attention, on tiny offline pipelines: gated
calls, denoiser work after the gate, ``disable``, ``gate_step=0``, the gate's mean over the
guidance parts, guidance switched off mid-run, and the refusal of joint attention."""

import numpy as np
import pytest
import torch

import tgate_kernels
from tgate_kernels.families.registry import single_stream_layout
from tgate_kernels.engine.guidance import MERGED, Mode
from fixtures.families import FAMILIES, GATED, REFUSED

from conftest import max_abs_diff

STEPS, GATE = 4, 2


def _run(pipe, family, steps=STEPS, **changes):
    with torch.no_grad():
        return pipe(**(family.call_kwargs(steps) | changes))


def _recorded(pipe, family, **changes):
    with tgate_kernels.view(pipe).record() as record:
        result = _run(pipe, family, **changes)
    return result, record


def _first_active_step(record, denoiser):
    return min(step for step in record.steps if record.calls(step, denoiser))


@pytest.mark.parametrize("name", GATED)
def test_a_guided_call_is_gated_in_every_denoiser(name):
    family = FAMILIES[name]
    pipe = tgate_kernels.enable(family.build(), gate_step=GATE, sp_interval=1, warm_up=0, **family.settings)
    result, record = _recorded(pipe, family)
    assert np.isfinite(_output(result)).all()
    layout = tgate_kernels.view(pipe).last_generation.layout
    assert layout is not None and layout.merges, f"{name} guides by classifier-free guidance: {layout}"
    assert record.steps == list(range(STEPS))
    for denoiser in family.denoisers:
        active = [step for step in record.steps if record.calls(step, denoiser)]
        assert active, f"{denoiser} never ran"
        for step in active:
            computed = record.computed(step, cross=True, denoiser=denoiser)
            if step < GATE:
                assert computed > 0, (denoiser, step)
            elif step == _first_active_step(record, denoiser):
                # an expert first used after the gate caches its own cross-attention once
                assert computed > 0 and record.reused(step, cross=True, denoiser=denoiser) == 0, (denoiser, step)
            else:
                assert computed == 0 and record.reused(step, cross=True, denoiser=denoiser) > 0, (denoiser, step)
    work = [sum(record.rows_run(step)) for step in record.steps]
    kept = len(layout.after_gate(layout.parts)) / len(layout.parts)
    assert all(work[step] == work[0] for step in range(GATE)), work
    assert all(work[step] == work[0] * kept for step in range(GATE, STEPS)), (work, layout)


@pytest.mark.parametrize("name", GATED)
def test_disable_is_bit_identical_to_never_enabled(name):
    family = FAMILIES[name]
    never_enabled = family.build()
    never = _output(_run(never_enabled, family))
    pipe = family.build()
    tgate_kernels.enable(pipe, gate_step=GATE, **family.settings)
    gated = _output(_run(pipe, family))
    tgate_kernels.disable(pipe)
    assert np.array_equal(_output(_run(pipe, family)), never)
    assert not np.array_equal(gated, never)
    for attribute in family.denoisers:
        # diffusers' own cache_context leaves a (hook-less) registry on cache-aware transformers
        ours, theirs = getattr(pipe, attribute), getattr(never_enabled, attribute)
        assert set(ours.__dict__) == set(theirs.__dict__), attribute
        for module in ours.modules():
            registry = module.__dict__.get("_diffusers_hook")
            assert "forward" not in module.__dict__ and (registry is None or not registry.hooks), attribute


@pytest.mark.parametrize("name", GATED)
def test_gate_zero_is_the_unguided_run_of_the_kept_part(name):
    family = FAMILIES[name]
    pipe = tgate_kernels.enable(family.build(), gate_step=0, **{**family.settings, "kept_part": "conditional"})
    gated, record = _recorded(pipe, family)
    changes = family.text_unguided_changes
    if changes is None:
        # InstructPix2Pix: only its text guidance is dropped; the image guidance keeps running
        layout = tgate_kernels.view(pipe).last_generation.layout
        assert layout.after_gate(layout.parts) == (MERGED, "unconditional")
        assert record.rows_run(0) == [2 * record.calls(0)[0].rows // 3]
        assert max_abs_diff(gated, _run(family.build(), family, **family.unguided)) > 1e-4
        return
    assert max_abs_diff(gated, _run(family.build(), family, **changes)) <= 1e-5


@pytest.mark.parametrize("gate_cache", ["mean", "kept-part"])
@pytest.mark.parametrize("name", GATED)
def test_the_gate_caches_the_mean_over_the_guidance_parts_or_the_kept_parts_own(name, gate_cache):
    family = FAMILIES[name]
    gate = 1  # the gate at the first step, the first reuse at the second: one expert of Wan 2.2 runs both
    settings = {**family.settings, "gate_cache": gate_cache}
    if family.settings.get("gate_cache", gate_cache) != gate_cache:
        # a family whose parts' text streams have no mean (Lumina 2's) is refused the mean
        pipe = family.build()
        with pytest.raises(ValueError, match=f"{family.pipeline_class} needs gate_cache='{family.settings['gate_cache']}'"):
            tgate_kernels.enable(pipe, gate_step=gate, **settings)
        assert not tgate_kernels.is_enabled(pipe)
        return
    pipe = tgate_kernels.enable(family.build(), gate_step=gate, kernels="off", **settings)
    cross = next(a for a in tgate_kernels.view(pipe).attentions if a.cross and a.denoiser == family.denoisers[0])
    outputs = []

    def text_output(output):
        # a single-stream block (all of CogVideoX's) returns its image and text outputs: the text is cached
        if isinstance(output, tuple):
            return output[0 if single_stream_layout(cross.module).returns_text_first else 1]
        return output

    cross.module.register_forward_hook(lambda module, args, output: outputs.append(text_output(output).detach().clone()))
    _run(pipe, family)
    layout = tgate_kernels.view(pipe).last_generation.layout
    if layout.mode is Mode.SEPARATE:
        per_step = len(layout.parts)
        at_gate = outputs[per_step * (gate - 1): per_step * gate]
        if at_gate[0].shape == at_gate[1].shape and gate_cache == "mean":
            expected = (at_gate[0] + at_gate[1]) / 2
        else:  # a text stream over texts of different lengths (Qwen-Image's) has no mean: the kept call's own
            expected = at_gate[layout.parts.index(layout.kept)]
        reused = outputs[per_step * gate]
    else:
        chunks = dict(zip(layout.parts, outputs[gate - 1].chunk(len(layout.parts))))
        merged = (chunks["negative"] + chunks["prompt"]) / 2 if gate_cache == "mean" else chunks[layout.kept]
        expected = torch.cat([merged if part == MERGED else chunks[part] for part in layout.after_gate(layout.parts)])
        reused = outputs[gate]
    assert reused.shape == expected.shape
    torch.testing.assert_close(reused, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", GATED)
def test_with_the_guidance_kept_after_the_gate_every_part_runs_on_what_it_cached_itself(name):
    """``guidance_after_gate="kept"``: the text frozen at the gate, the guidance not dropped. Every
    step runs every part, none computes cross-attention (or a text stream) after the gate, and
    each part reuses what it cached itself: the output differs from dropping the guidance."""
    family = FAMILIES[name]
    schedule = dict(gate_step=GATE, sp_interval=1, warm_up=0, **family.settings)
    pipe = tgate_kernels.enable(family.build(), **schedule, guidance_after_gate="kept")
    result, record = _recorded(pipe, family)
    work = [sum(record.rows_run(step)) for step in record.steps]
    assert work == [work[0]] * STEPS, work
    for denoiser in family.denoisers:
        first = _first_active_step(record, denoiser)
        for step in range(max(GATE, first + 1), STEPS):  # an expert first used after the gate caches once
            computed, reused = record.computed(step, cross=True, denoiser=denoiser), record.reused(step, cross=True, denoiser=denoiser)
            assert computed == 0 and (reused > 0 or not record.calls(step, denoiser)), (denoiser, step)
    dropped = _run(tgate_kernels.enable(family.build(), **schedule), family)
    assert max_abs_diff(result, dropped) > 1e-4


def test_with_the_guidance_kept_each_part_reuses_its_own_cross_attention_and_text_stream():
    """Batched (SD: one call, [negative, prompt] rows) and separate calls (FLUX: prompt, then
    negative): after the gate each part's rows get exactly what that part gave at the gate."""
    for name, module_of in (
        ("sd", lambda pipe: pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2),
        ("flux", lambda pipe: pipe.transformer.transformer_blocks[0].attn.add_k_proj),
    ):
        family = FAMILIES[name]
        pipe = tgate_kernels.enable(family.build(), gate_step=GATE, guidance_after_gate="kept", kernels="off")
        outputs = []
        module_of(pipe).register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
        _run(pipe, family)
        per_step = len(outputs) // STEPS
        assert per_step * STEPS == len(outputs)
        at_gate = outputs[(GATE - 1) * per_step: GATE * per_step]
        for step in range(GATE, STEPS):
            for reused, cached in zip(outputs[step * per_step: (step + 1) * per_step], at_gate):
                assert torch.equal(reused, cached), (name, step)
        assert not torch.equal(at_gate[0], outputs[(GATE - 2) * per_step]), "computed before the gate"


def _output(result):
    for name in ("frames", "images", "audios"):
        if hasattr(result, name):
            result = getattr(result, name)
            break
    return result.float().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)


# ---------------------------------------------------------------- guidance switched off mid-run


def _cutoff_callback(name, step):
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    if name == "sd":
        return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)
    if name == "sdxl":
        return SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)

    def cutoff(pipe, index, timestep, callback_kwargs):
        if index == step:
            pipe._guidance_scale = 1.0
        return callback_kwargs

    return cutoff


@pytest.mark.parametrize("name", ["sd", "sdxl", "wan21"])
@pytest.mark.parametrize("cutoff", [0, GATE - 1, GATE])
def test_a_callback_switching_guidance_off_before_at_or_after_the_gate(name, cutoff):
    """diffusers' documented dynamic CFG: from step ``cutoff + 1`` the pipeline runs the prompt alone."""
    family = FAMILIES[name]
    steps = GATE + 2
    pipe = tgate_kernels.enable(family.build(), gate_step=GATE)
    with tgate_kernels.view(pipe).record() as record:
        result = _run(pipe, family, steps=steps, callback_on_step_end=_cutoff_callback(name, cutoff))
    assert np.isfinite(_output(result)).all()
    one_part = record.calls(0)[0].rows // (1 if name == "wan21" else 2)
    for step in range(cutoff + 1, steps):
        assert sum(record.rows_run(step)) == one_part, step
    for step in range(GATE, steps):
        assert record.computed(step, cross=True) == 0, step
    if name != "sdxl" and cutoff >= GATE - 1:
        # after the gate the text reaches the denoiser through the cached cross-attention only:
        # the prompt's part gives what the kept part gave
        plain = tgate_kernels.enable(family.build(), gate_step=GATE)
        assert max_abs_diff(result, _run(plain, family, steps=steps)) == 0.0


# ---------------------------------------------------------------- refusal


@pytest.mark.parametrize("name", REFUSED)
def test_joint_attention_pipelines_are_refused_with_nothing_modified(name):
    family = FAMILIES[name]
    pipe = family.build()
    before = set(pipe.__dict__)
    with pytest.raises(ValueError) as info:
        tgate_kernels.enable(pipe)
    message = str(info.value)
    assert type(pipe).__name__ in message and "joint attention" in message and "Nothing was changed" in message
    assert set(pipe.__dict__) == before
    assert not any("_diffusers_hook" in m.__dict__ for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())
    assert np.array_equal(_output(_run(pipe, family)), _output(_run(family.build(), family)))


@pytest.mark.parametrize("name", [name for name in GATED if FAMILIES[name].settings])
def test_a_family_gated_under_settings_of_its_own_is_refused_without_them_with_nothing_modified(name):
    family = FAMILIES[name]
    pipe = family.build()
    before = set(pipe.__dict__)
    for wanted in family.settings:
        with pytest.raises(ValueError, match=f"{family.pipeline_class} needs .*{wanted}=.*Nothing was changed"):
            tgate_kernels.enable(pipe, **{k: v for k, v in family.settings.items() if k != wanted})
    with pytest.raises(ValueError, match=f"{family.pipeline_class} needs"):
        tgate_kernels.TgateSDLoader(pipe)
    assert set(pipe.__dict__) == before and not tgate_kernels.is_enabled(pipe)
    assert not any("_diffusers_hook" in m.__dict__ for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules())


class _LoopPipeline:
    """A pipeline-shaped loop running its UNet on ``parts`` copies of the latents, passing
    ``extra`` keyword arguments along."""

    def __init__(self, unet, scheduler, parts, **extra):
        self.unet, self.scheduler, self.parts, self.extra = unet, scheduler, parts, extra

    def progress_bar(self, total=None, iterable=None):
        class Bar:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                pass

        return Bar()

    def prepare_latents(self, batch):
        return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def __call__(self, steps=3):
        latents = self.prepare_latents(1)
        text = torch.randn(self.parts, 77, 32, generator=torch.Generator().manual_seed(1))
        self.scheduler.set_timesteps(steps)
        with self.progress_bar(total=steps) as bar:
            for t in self.scheduler.timesteps:
                noise = self.unet(torch.cat([latents] * self.parts), t, encoder_hidden_states=text, **self.extra).sample
                latents = self.scheduler.step(noise.chunk(self.parts)[0], t, latents).prev_sample
                bar.update()
        return latents


def _refused_at_the_first_call(pipe, *words):
    plain = pipe()
    tgate_kernels.enable(pipe, gate_step=1)
    with tgate_kernels.view(pipe).record() as record:
        with pytest.raises((RuntimeError, ValueError)) as info:
            pipe()
    assert all(word in str(info.value) for word in words), str(info.value)
    assert record.computed(0, cross=True) == 0 and record.computed(0, cross=False) == 0, "stopped before the denoiser ran"
    tgate_kernels.disable(pipe)
    assert torch.equal(pipe(), plain)
    assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in pipe.unet.modules())


def test_an_unknown_guidance_layout_is_refused_at_the_first_call_before_anything_is_cached():
    sd = FAMILIES["sd"].build()
    _refused_at_the_first_call(
        _LoopPipeline(sd.unet, sd.scheduler, parts=4), "_LoopPipeline", "step 0, call 1 of `unet` ran on 4 rows for 1 latents"
    )


def test_a_denoiser_argument_t_gate_cannot_place_is_refused_at_the_first_call():
    from diffusers import UNet2DConditionModel

    class UNetWithHints(UNet2DConditionModel):
        def forward(self, sample, timestep, encoder_hidden_states, hints=None, **kwargs):
            return super().forward(sample, timestep, encoder_hidden_states, **kwargs)

    sd = FAMILIES["sd"].build()
    unet = UNetWithHints.from_config(sd.unet.config)
    unet.load_state_dict(sd.unet.state_dict())
    pipe = _LoopPipeline(unet, sd.scheduler, parts=2, hints=torch.zeros(2, 3))
    _refused_at_the_first_call(pipe, "UNetWithHints.forward got `hints` with 2 rows", "CARRY_PARTS")


class _SeparateCallsPipeline(_LoopPipeline):
    """Classifier-free guidance as two UNet calls per step (prompt, then negative), the negative
    call with ``negative_extra`` instead of ``extra``."""

    do_classifier_free_guidance = property(lambda self: True)

    def __init__(self, unet, scheduler, extra, negative_extra):
        super().__init__(unet, scheduler, parts=1)
        self.extra_of = {"prompt": extra, "negative": negative_extra}

    @torch.no_grad()
    def __call__(self, steps=3):
        latents = self.prepare_latents(1)
        texts = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
        self.scheduler.set_timesteps(steps)
        with self.progress_bar(total=steps) as bar:
            for t in self.scheduler.timesteps:
                cond, uncond = (self.unet(latents, t, encoder_hidden_states=text, **self.extra_of[part]).sample
                                for text, part in zip(texts, ("prompt", "negative")))
                latents = self.scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
                bar.update()
        return latents


def test_separate_calls_that_differ_in_more_than_the_text_are_refused_at_the_first_step():
    """A negative call that also blanks another input (WanAnimate blanks the face) guides by it
    too; T-GATE would drop that guidance with the text's after the gate."""
    from diffusers import UNet2DConditionModel

    class UNetWithFace(UNet2DConditionModel):
        def forward(self, sample, timestep, encoder_hidden_states, face=None, **kwargs):
            return super().forward(sample + 0.1 * face.mean(), timestep, encoder_hidden_states, **kwargs)

    sd = FAMILIES["sd"].build()
    unet = UNetWithFace.from_config(sd.unet.config)
    unet.load_state_dict(sd.unet.state_dict())
    face = torch.ones(1, 3)
    same = _SeparateCallsPipeline(unet, sd.scheduler, {"face": face}, {"face": face.clone()})
    tgate_kernels.enable(same, gate_step=2)
    with tgate_kernels.view(same).record() as record:
        same(steps=4)
    assert record.rows_run(3) == [1, 0], "after the gate the negative call gets the prompt call's result"
    tgate_kernels.disable(same)
    blanked = _SeparateCallsPipeline(unet, sd.scheduler, {"face": face}, {"face": face * 0 - 1})
    plain = blanked(steps=4)
    tgate_kernels.enable(blanked, gate_step=2)
    with pytest.raises(ValueError, match="the negative call differs from the prompt call in `face`, not only in the text"):
        blanked(steps=4)
    tgate_kernels.disable(blanked)
    assert torch.equal(blanked(steps=4), plain)


def test_pipelines_whose_guidance_t_gate_would_misread_are_refused_at_enable():
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

    sd = FAMILIES["sd"].build()
    components = {k: v for k, v in sd.components.items() if k != "image_encoder"}
    components["scheduler"] = DPMSolverMultistepScheduler.from_config(sd.scheduler.config, algorithm_type="sde-dpmsolver++")
    pipe = LEditsPPPipelineStableDiffusion(**components)
    before = set(pipe.__dict__)
    with pytest.raises(ValueError, match="one part per edit concept, not a negative prompt and a prompt"):
        tgate_kernels.enable(pipe)
    with pytest.raises(ValueError, match="LEditsPPPipelineStableDiffusion"):
        tgate_kernels.TgateSDLoader(pipe)
    assert set(pipe.__dict__) == before and not any("_diffusers_hook" in m.__dict__ for m in pipe.unet.modules())


def test_a_callback_switching_guidance_off_between_the_two_calls_of_a_second_order_step():
    """Heun calls the UNet twice a solver step and the callback runs after each call: guidance
    switched off after the first is followed from the second, not taken for an extra call."""
    from diffusers import HeunDiscreteScheduler
    from diffusers.callbacks import SDCFGCutoffCallback

    family = FAMILIES["sd"]
    pipe = family.build()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    tgate_kernels.enable(pipe, gate_step=GATE)
    with tgate_kernels.view(pipe).record() as record:
        result = _run(pipe, family, steps=4, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2))
    assert np.isfinite(_output(result)).all()
    assert record.rows_run(1) == [2, 1], "the second call of solver step 1 runs the prompt alone"
