"""The MACs counter against hand-computed counts, and T-GATE's savings against the schedule."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

import tgate_kernels
from tgate_kernels.tools.benchmarking.architectures import architecture, architectures
from tgate_kernels.tools.benchmarking.macs import (
    MacsCount,
    count_macs,
    forward_breakdown,
    generation_macs,
    planned_generation_macs,
)
from tgate_kernels.tools.benchmarking.params import denoiser_params
from tgate_kernels.config import TgateConfig
from tgate_kernels.schedule import AttentionAction, plan_generation

from conftest import TINY_ARCHITECTURES, tiny_architecture


def test_linear_stack_macs_by_hand():
    with torch.device("meta"):
        stack = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8, bias=False))
        x = torch.zeros(3, 5, 16)
    counted = count_macs(lambda: stack(x))
    assert counted == MacsCount(total=3 * 5 * (16 * 32 + 32 * 8), attention_scores=0)


def test_attention_macs_by_hand_and_the_score_convention():
    batch, queries, keys, dim, context_dim, heads = 2, 10, 7, 24, 12, 3
    with torch.device("meta"):
        attention = Attention(query_dim=dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim // heads)
        hidden = torch.zeros(batch, queries, dim)
        context = torch.zeros(batch, keys, context_dim)
    counted = count_macs(lambda: attention(hidden, encoder_hidden_states=context))
    projections = batch * (queries * dim * dim + 2 * keys * context_dim * dim + queries * dim * dim)
    scores = batch * 2 * queries * keys * dim  # QK^T and PV over all heads
    assert counted.attention_scores == scores
    assert counted.without_attention_scores == projections
    assert counted.total - counted.without_attention_scores == scores


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-pixart", "tiny-sd3", "tiny-flux", "tiny-hunyuan-video", "tiny-cogvideox"])
def test_engine_savings_equal_the_schedule(name):
    arch = tiny_architecture(name)
    settings = arch.tgate_config()
    baseline = generation_macs(arch, None)
    gated = generation_macs(arch, arch.tgate_config())
    breakdown = forward_breakdown(arch)

    assert baseline == breakdown.total * (2 * arch.steps)
    # By hand from the plans: CFG batch of 2 up to and including the gate step, 1 after it; an
    # attention kind is skipped at a step whose plan reuses it once something is cached.
    # A joint attention (scheduled as self-attention) holds text-stream work: a step reusing both
    # kinds skips that once.
    expected_saved = MacsCount(0, 0)
    cached = {False: False, True: False}
    for plan in plan_generation(settings, arch.steps):
        batch = 2 if plan.cfg_batch else 1
        expected_saved += breakdown.total * (2 - batch)
        reused = {}
        for cross, action in ((False, plan.self_attention), (True, plan.cross_attention)):
            reused[cross] = action is AttentionAction.REUSE and cached[cross]
            if reused[cross]:
                expected_saved += breakdown.attention(cross) * batch
            cached[cross] = cached[cross] or action is AttentionAction.CACHE
        if reused[False] and reused[True]:
            expected_saved -= breakdown.nested * batch
    assert baseline - gated == expected_saved
    assert gated == planned_generation_macs(breakdown, settings, arch.steps, cfg=True)
    assert expected_saved.total > 0 and expected_saved.attention_scores > 0 and breakdown.cross_attention.total > 0


def test_gate_at_the_end_with_no_self_attention_reuse_saves_nothing():
    arch = tiny_architecture("tiny-sd")
    plain = generation_macs(arch, None)
    assert generation_macs(arch, TgateConfig(gate_step=arch.steps, sp_interval=1, warm_up=0)) == plain


def test_breakdown_splits_self_and_cross_attention():
    breakdown = forward_breakdown(tiny_architecture("tiny-pixart"))
    # Two transformer blocks of 3 heads x 8 = 24 channels, 16 image tokens, 16 text tokens of 24.
    tokens, text, dim, blocks = 16, 16, 24, 2
    assert breakdown.self_attention.without_attention_scores == blocks * 4 * tokens * dim * dim
    assert breakdown.cross_attention.without_attention_scores == blocks * (2 * tokens * dim * dim + 2 * text * dim * dim)
    assert breakdown.self_attention.attention_scores == blocks * 2 * tokens * tokens * dim
    assert breakdown.cross_attention.attention_scores == blocks * 2 * tokens * text * dim


def test_published_sd15_baseline_reproduced_and_the_gated_count_follows_the_schedule_by_hand():
    """The published SD-1.5 baseline (16.938T at 512 px, 25 steps, CFG; attention scores left out,
    as calflops counts). The published T-GATE row (9.875T) counts something else (its params drop
    the cross-attention weights too), so the gated count is checked against the schedule worked out
    by hand: steps 0-9 run the CFG batch, self-attention is reused at steps 3, 4, 6, 7 and 8
    (warm_up 2, sp_interval 5, gate 10), and steps 10-24 run one half without cross-attention."""
    arch = architecture("sd15")
    breakdown = forward_breakdown(arch)
    baseline = planned_generation_macs(breakdown, None, 25, cfg=True)
    gated = planned_generation_macs(breakdown, TgateConfig(gate_step=10), 25, cfg=True)
    assert abs(baseline.without_attention_scores - 16.938e12) / 16.938e12 < 1e-3
    forward, self_attention = breakdown.total, breakdown.self_attention
    by_hand = (forward * 10 - self_attention * 5) * 2 + (forward - breakdown.cross_attention) * 15
    assert gated == by_hand


def test_video_and_dit_configs_count_what_the_engine_skips():
    """The Sana, Wan 2.1 and LTX-Video rows: the engine's count equals the schedule's, and the
    parameter counts are those of the released checkpoints."""
    from tgate_kernels.tools.benchmarking.architectures import architecture

    expected_params = {"sana-1600m": 1.604e9, "wan21-1.3b": 1.419e9, "ltx-video": 1.923e9}
    for name, params in expected_params.items():
        arch = architecture(name)
        denoiser = arch.build_denoiser("meta")
        assert denoiser_params(denoiser).total == pytest.approx(params, rel=1e-3), name
        breakdown = forward_breakdown(arch, resolution=arch.resolution // 4, denoiser=denoiser)
        settings = TgateConfig(gate_step=2, sp_interval=arch.sp_interval, warm_up=arch.warm_up)
        planned = planned_generation_macs(breakdown, settings, 5, cfg=True)
        counted = generation_macs(arch, TgateConfig(gate_step=2, sp_interval=arch.sp_interval, warm_up=arch.warm_up),
                                  steps=5, resolution=arch.resolution // 4, denoiser=denoiser)
        assert counted == planned and planned.total < planned_generation_macs(breakdown, None, 5, cfg=True).total, name


def test_params_of_the_real_configs_match_the_published_table():
    sd15 = denoiser_params(architecture("sd15").build_denoiser("meta"))
    assert sd15.total == 859_520_964
    assert round(sd15.after_gate_published_convention / 1e6, 3) == pytest.approx(815.558, abs=0.002)
    pixart = denoiser_params(architecture("pixart-alpha").build_denoiser("meta"))
    assert round(pixart.total / 1e6, 2) == 611.35
    assert round(pixart.after_gate_published_convention / 1e6, 2) == 462.58
    assert pixart.cross_attention_norms == 0  # PixArt's norm2 has no affine parameters
    assert sd15.cross_attention_norms == 2 * (5 * 320 + 5 * 640 + 6 * 1280)


def test_every_shipped_config_builds_on_meta():
    from tgate_kernels.engine.attention_modules import hookable_attentions

    for arch in architectures((TINY_ARCHITECTURES,)).values():
        model = arch.build_denoiser("meta")
        assert any(a.cross for a in hookable_attentions(model, arch.text_streams)), arch.name


def test_enable_takes_the_loop_driver():
    from tgate_kernels.tools.benchmarking.denoising_loop import DenoisingLoop

    arch = tiny_architecture("tiny-sd")
    loop = DenoisingLoop(arch, arch.build_denoiser("meta"), cfg=True)
    tgate_kernels.enable(loop, gate_step=2)
    assert tgate_kernels.is_enabled(loop)
    tgate_kernels.disable(loop)
    assert not tgate_kernels.is_enabled(loop)


def test_counts_scale_with_the_batch_in_both_columns():
    """On ``meta`` SDXL's linear ``proj_in`` runs as ``bmm`` at batch 2 but ``mm`` at batch 1;
    telling scores by operator type once moved those MACs into the scores column."""
    from tgate_kernels.tools.benchmarking.architectures import architecture
    from tgate_kernels.tools.benchmarking.denoising_loop import denoiser_inputs
    from tgate_kernels.tools.benchmarking.macs import count_macs

    arch = architecture("sdxl")
    unet = arch.build_denoiser("meta")
    counts = {}
    for batch in (1, 2):
        args, kwargs = denoiser_inputs(arch, batch)
        with torch.no_grad():
            counts[batch] = count_macs(lambda: unet(*args, **kwargs))
    assert counts[2].total == 2 * counts[1].total
    assert counts[2].attention_scores == 2 * counts[1].attention_scores > 0


def test_attention_scores_are_counted_from_the_attention_call():
    from tgate_kernels.tools.benchmarking.macs import count_macs

    q = torch.zeros(2, 3, 10, 4, device="meta")
    k = torch.zeros(2, 3, 7, 4, device="meta")
    v = torch.zeros(2, 3, 7, 5, device="meta")
    mask = torch.zeros(2, 1, 1, 7, device="meta")
    counted = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert counted.total == counted.attention_scores == 2 * 3 * 10 * 7 * (4 + 5)
    # diffusers' attention dispatcher (Wan, LTX-Video) passes keywords and `enable_gqa`
    by_keyword = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(
        query=q, key=k[:, :1], value=v[:, :1], attn_mask=mask, enable_gqa=True))
    assert by_keyword == counted


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_denoisers_generation_is_timed_baseline_against_t_gate(name):
    """What the GPU checks time for SD3.5 Large and FLUX.1-dev, on the CPU with tiny configs."""
    from tgate_kernels.tools.benchmarking.loop_latency import loop_latency

    arch = tiny_architecture(name)
    timed = loop_latency(arch, device="cpu", dtype=torch.float32, rounds=1)
    assert timed.baseline_s > 0 and timed.tgate_s > 0 and timed.steps == arch.steps and timed.gate_step == arch.gate_step
    assert timed.ratio == timed.tgate_s / timed.baseline_s
