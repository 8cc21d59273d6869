"""T-GATE on joint-attention transformers (Stable Diffusion 3's MMDiT): after the gate the text
stream is frozen (its modules give what they cached at the gate, as the mean over the guidance
parts) and classifier-free guidance is dropped. The family-matrix tests (test_families.py) run
on SD3 too; these check what is particular to the text stream."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tgate_kernels
from tgate_kernels.engine.attention_modules import AttentionKind
from fixtures.families import FAMILIES

STEPS, GATE = 4, 2
SD3 = FAMILIES["sd3"]


def _latents(pipe, steps=STEPS):
    with torch.no_grad():
        return pipe(**SD3.call_kwargs(steps)).images


def test_the_text_stream_of_every_dual_stream_block_is_hooked_and_the_joint_attention_is_not():
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
    assert not any(a.name.endswith(".attn") for a in attentions), "the joint attention itself is computed every step"


def test_with_the_gate_never_reached_the_output_is_the_plain_pipelines():
    plain = _latents(SD3.build())
    pipe = tgate_kernels.enable(SD3.build(), gate_step=STEPS, sp_interval=1, warm_up=0)
    assert torch.equal(_latents(pipe), plain)


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


def _step_flops(pipe, step):
    """FLOPs of one denoising step (its transformer call and the scheduler's update)."""
    counter = FlopCounterMode(display=False)

    def around_step(pipe_, index, timestep, callback_kwargs):
        if index == step - 1:
            counter.__enter__()
        elif index == step:
            counter.__exit__(None, None, None)
        return callback_kwargs

    with torch.no_grad():
        pipe(**SD3.call_kwargs(STEPS), callback_on_step_end=around_step)
    return counter.get_total_flops()


def test_after_the_gate_a_step_costs_less_than_dropping_guidance_alone():
    plain = _step_flops(SD3.build(), GATE)
    gated = _step_flops(tgate_kernels.enable(SD3.build(), gate_step=GATE, sp_interval=1, warm_up=0), GATE)
    assert 0 < gated < plain / 2, (gated, plain)


def test_compile_gives_eager_t_gates_latents():
    torch._dynamo.reset()
    eager = _latents(tgate_kernels.enable(SD3.build(), gate_step=GATE, kernels="off"))
    compiled = _latents(tgate_kernels.enable(SD3.build(), gate_step=GATE, compile={"backend": "eager"}))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flux", "qwenimage", "lumina2"])
def test_joint_attention_families_not_done_yet_stay_refused(name):
    family = FAMILIES[name]
    with pytest.raises(ValueError, match="joint attention"):
        tgate_kernels.enable(family.build())
