"""The post-gate block fast path: kernels on vs off, what it skips, and torch.compile."""

import numpy as np
import pytest
import torch

import tgate_kernels
from fixtures.tiny_pipelines import tiny_pixart_alpha, tiny_sd, tiny_sdxl
from conftest import hooked_modules

CASES = {
    "sd": (tiny_sd, dict(height=32, width=32)),
    "sdxl": (tiny_sdxl, dict(height=32, width=32)),
    "pixart": (tiny_pixart_alpha, dict(clean_caption=False)),
}


def call(extra, steps=6):
    return dict(prompt=["a cat", "a dog"], num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0), **extra)


def _count_calls(pipe, modules):
    """Calls of ``modules`` per step, the step counted by the scheduler's steps (one denoiser call
    each with the schedulers used here)."""
    calls: dict[int, int] = {}
    step = [0]
    scheduler_step = pipe.scheduler.step

    def count(module, args, output):
        calls[step[0]] = calls.get(step[0], 0) + 1

    def counting_step(*args, **kwargs):
        step[0] += 1
        return scheduler_step(*args, **kwargs)

    for module in modules:
        module.register_forward_hook(count)
    pipe.scheduler.step = counting_step
    return calls


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_on_and_off_agree_and_the_fast_path_skips_norm2_and_attn2(name):
    factory, extra = CASES[name]
    gate = 2
    off_pipe = tgate_kernels.enable(factory(), gate_step=gate, kernels="off")
    off = off_pipe(**call(extra)).images
    on_pipe = tgate_kernels.enable(factory(), gate_step=gate, kernels="auto")
    view = tgate_kernels.view(on_pipe)
    blocks = view.fast_blocks
    assert blocks, "the tiny pipeline has blocks of a known shape"
    skipped = [b.norm3 if b.norm_type == "layer_norm" else b.attn2 for b in blocks] + [b.attn2 for b in blocks]
    if blocks[0].norm_type == "layer_norm":
        skipped += [b.norm2 for b in blocks]
    calls = _count_calls(on_pipe, skipped)
    with view.record() as record:
        on = on_pipe(**call(extra)).images
    assert float(np.abs(on - off).max()) <= 1e-5
    assert all(calls.get(step, 0) > 0 for step in range(gate)), "before the gate the block's own forward runs"
    assert all(calls.get(step, 0) == 0 for step in range(gate, 6)), "after the gate norm2/attn2/norm3 never run"
    # the cached cross-attention was used by every fast block at every post-gate step
    assert all(record.reused(step, cross=True) == len(blocks) for step in range(gate, 6))
    # off attaches nothing to the blocks
    assert tgate_kernels.view(off_pipe).fast_blocks == ()
    assert not any(m in hooked_modules(off_pipe) for m in blocks)


def test_kernels_off_is_bit_exact_with_the_reference(reference):
    tgate = reference
    expected = tgate.TgateSDLoader(tiny_sd()).tgate(gate_step=2, **call(CASES["sd"][1])).images
    ours = tgate_kernels.enable(tiny_sd(), gate_step=2, kernels="off")(**call(CASES["sd"][1])).images
    assert np.array_equal(ours, expected)


def test_switching_kernels_attaches_and_detaches_block_hooks():
    pipe = tgate_kernels.enable(tiny_sd(), kernels="off")
    assert tgate_kernels.view(pipe).fast_blocks == ()
    tgate_kernels.enable(pipe, kernels="auto")
    view = tgate_kernels.view(pipe)
    blocks = view.fast_blocks
    assert blocks and all(b in hooked_modules(pipe) for b in blocks) and view.kernels is tgate_kernels.KernelMode.AUTO
    tgate_kernels.disable(pipe)
    assert not any(hasattr(b, "_diffusers_hook") or "forward" in b.__dict__ for b in blocks)


def test_bad_kernels_value_is_refused_before_anything_is_modified():
    pipe = tiny_sd()
    with pytest.raises(ValueError, match=r"`kernels` must be one of \('auto', 'off'\).*'fast'"):
        tgate_kernels.enable(pipe, kernels="fast")
    assert not hasattr(pipe.unet, "_diffusers_hook") and "tgate" not in pipe.__dict__


def test_fast_path_falls_back_for_dtypes_the_op_does_not_take():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2).to(torch.float64)
    with tgate_kernels.view(pipe).record() as record:
        images = pipe(**call(CASES["sd"][1])).images
    assert np.isfinite(images).all()
    assert record.reused(3, cross=True) > 0
    expected = tgate_kernels.enable(tiny_sd(), gate_step=2, kernels="off").to(torch.float64)(**call(CASES["sd"][1])).images
    assert np.array_equal(images, expected), "float64 blocks run the block's own forward"


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_torch_compile_fullgraph_with_a_bounded_number_of_graphs(kernels):
    """One graph per distinct step plan, whatever the number of steps: here warm-up, cache,
    gate and post-gate (4); at most 6 for any settings (3 self-attention actions before the gate,
    the gate, 2 after it)."""
    from torch._dynamo.utils import counters

    settings = dict(gate_step=3, sp_interval=2, warm_up=1, kernels=kernels)
    eager = tgate_kernels.enable(tiny_sd(), **settings)(**call(CASES["sd"][1], steps=12)).images
    pipe = tgate_kernels.enable(tiny_sd(), **settings)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet.compile(backend="eager", fullgraph=True)
    compiled = pipe(**call(CASES["sd"][1], steps=12)).images
    graphs = counters["stats"]["unique_graphs"]
    assert float(np.abs(compiled - eager).max()) <= 1e-5
    assert 1 < graphs <= 6
    again = pipe(**call(CASES["sd"][1], steps=12)).images
    assert counters["stats"]["unique_graphs"] == graphs, "a second call compiles nothing new"
    assert np.array_equal(again, compiled)
    torch._dynamo.reset()


def test_affine_feed_forward_norm_of_pixart_blocks_is_applied():
    from diffusers import PixArtTransformer2DModel

    def with_affine_norm():
        pipe = tiny_pixart_alpha()
        config = {**pipe.transformer.config, "norm_elementwise_affine": True}
        torch.manual_seed(3)
        transformer = PixArtTransformer2DModel.from_config(config)
        with torch.no_grad():
            for block in transformer.transformer_blocks:
                block.norm2.weight.normal_(1.0, 0.5)
                block.norm2.bias.normal_(0.0, 0.5)
        pipe.transformer = transformer
        return pipe

    extra = CASES["pixart"][1]
    off = tgate_kernels.enable(with_affine_norm(), gate_step=2, kernels="off")(**call(extra)).images
    on_pipe = tgate_kernels.enable(with_affine_norm(), gate_step=2)
    assert tgate_kernels.view(on_pipe).fast_blocks
    assert float(np.abs(on_pipe(**call(extra)).images - off).max()) <= 1e-5
