"""``tgate-kernels quality`` on the shipped micro pipelines: every variant measured on the same
prompts and seeds, MACs counted while generating, auto's gate inside its window, the Pareto
verdict, and bad options refused."""

import json

import pytest
import torch

from tgate_kernels.tools import cli
from tgate_kernels.tools.micro import quality
from tgate_kernels.tools.micro.adherence import MICRO_CALL
from tgate_kernels.tools.micro.diffusers_caches import DIFFUSERS_CACHES
from tgate_kernels.tools.micro.quality_report import pareto_verdicts, render
from tgate_kernels.config import AutoGate

SMALL = quality.QualitySettings(gates=(4, 8), images_per_prompt=1, batch_size=4, prompts=quality.EVAL_PROMPTS[::6])


@pytest.fixture(scope="module")
def sd_rows():
    return quality.measure_quality("sd", SMALL)


def test_every_variant_is_measured_against_the_ungated_images(sd_rows):
    by_variant = {row.variant: row for row in sd_rows}
    assert list(by_variant) == ["ungated", "ungated, other seeds", "gate 4", "gate 8", "gate 4, prompt's own",
                                "gate 8, prompt's own", "gate 4, guidance kept", "gate 8, guidance kept",
                                "gate 4 + DeepCache", "gate 8 + DeepCache", "auto", "CFG truncated at 4", "CFG truncated at 8"]
    # the text frozen with the guidance kept: every step still runs both parts, cross-attention
    # skipped after the gate, so it costs more than T-GATE and less than the ungated run
    for gate in (4, 8):
        kept = by_variant[f"gate {gate}, guidance kept"]
        assert by_variant[f"gate {gate}"].macs_ratio < kept.macs_ratio < 1.0
        assert kept.psnr != by_variant[f"gate {gate}"].psnr
    # keeping the prompt's part with its own cache costs what the reference's choice costs
    assert by_variant["gate 4, prompt's own"].macs_ratio == by_variant["gate 4"].macs_ratio
    assert by_variant["gate 4, prompt's own"].psnr != by_variant["gate 4"].psnr
    ungated = by_variant["ungated"]
    assert (ungated.macs_ratio, ungated.ssim, ungated.fid, ungated.psnr) == (1.0, 1.0, 0.0, None)
    assert all(row.images == len(SMALL.prompts) for row in sd_rows)
    # an earlier gate skips more work; DeepCache skips more on top; other seeds cost the same
    assert by_variant["gate 4"].macs_ratio < by_variant["gate 8"].macs_ratio < 1.0
    assert by_variant["gate 4 + DeepCache"].macs_ratio < by_variant["gate 4"].macs_ratio
    assert by_variant["ungated, other seeds"].macs_ratio == 1.0
    # CFG truncation at gate g of 20 steps: g guided steps, then unguided ones at half the rows;
    # T-GATE at the same gate skips cross-attention and some self-attention on top
    for gate in (4, 8):
        truncated = by_variant[f"CFG truncated at {gate}"]
        assert truncated.macs_ratio == pytest.approx((2 * gate + 20 - gate) / 40, rel=1e-9)
        assert by_variant[f"gate {gate}"].macs_ratio < truncated.macs_ratio
        assert truncated.psnr > by_variant["ungated, other seeds"].psnr
    # a gated image stays much closer to its ungated image than an image from other seeds does
    assert by_variant["gate 8"].psnr > by_variant["ungated, other seeds"].psnr + 10
    assert by_variant["gate 8"].ssim > by_variant["ungated, other seeds"].ssim
    assert all(0.0 <= row.adherence <= 1.0 and row.fid >= 0.0 for row in sd_rows)
    # partial credit is at least whole-scene credit
    assert all(row.adherence <= row.attribute_adherence <= 1.0 for row in sd_rows)


def test_auto_reports_the_gates_it_chose_within_its_window(sd_rows):
    auto = next(row for row in sd_rows if row.kind == "auto")
    earliest, latest = AutoGate().window(MICRO_CALL["sd"]["num_inference_steps"])
    batches = -(-len(SMALL.prompts) // SMALL.batch_size)
    assert len(auto.gates_chosen) == batches
    assert all(earliest <= gate <= latest for gate in auto.gates_chosen)
    assert auto.gate_step == sum(auto.gates_chosen) / batches
    assert 0.0 < auto.macs_ratio < 1.0


def test_the_pareto_verdict_names_the_fixed_gates_that_beat_auto(sd_rows):
    auto = next(row for row in sd_rows if row.kind == "auto")
    better = quality.QualityRow("sd", "gate 1", "fixed", 1, auto.adherence + 0.1, 30.0, 0.9, 1.0, auto.macs_ratio - 0.1, 1)
    worse = quality.QualityRow("sd", "gate 2", "fixed", 2, auto.adherence + 0.1, 30.0, 0.9, 1.0, auto.macs_ratio + 0.1, 1)
    assert quality.dominating(auto, [better, worse]) == [better]
    assert "beat it on both axes" in pareto_verdicts([auto, better])[0]
    assert "on or above the fixed-gate front" in pareto_verdicts([auto, worse])[0]
    text = render(sd_rows, [], SMALL)
    assert "gate 8 + DeepCache" in text and "MACs ratio" in text
    kept = next(row for row in sd_rows if row.variant == "gate 4, guidance kept")
    assert (f"- sd, gate 4: text frozen, guidance kept {100 * kept.adherence:.1f}% (MACs {kept.macs_ratio:.3f}); "
            f"guidance dropped, nothing frozen ") in text


def test_cfg_truncation_gives_what_diffusers_cfg_cutoff_gives_for_one_prompt():
    """diffusers' own cut-off callback is right for one prompt (it keeps one row of embeddings):
    from the same step on, the truncation's denoiser wrapper gives the same images."""
    from diffusers.callbacks import SDCFGCutoffCallback
    from fixtures.tiny_pipelines import tiny_sd

    from tgate_kernels.tools.micro.cfg_truncation import CFGTruncation

    steps, gate = 6, 2
    call = dict(prompt="a red square", num_inference_steps=steps, guidance_scale=5.0, output_type="latent", height=32, width=32)
    pipe = tiny_sd()
    with torch.no_grad():
        expected = pipe(**call, generator=torch.Generator().manual_seed(0),
                        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=gate - 1),
                        callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
        pipe = tiny_sd()
        with CFGTruncation(pipe.unet, gate) as truncation:
            truncation.new_generation()
            truncated = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(truncated, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(truncated, plain), "guidance was dropped"
    assert "forward" not in pipe.unet.__dict__, "the denoiser is given back as it was"


def test_cfg_truncation_of_true_cfg_skips_the_negative_prompts_calls_from_the_cutoff_on():
    """FLUX's true CFG: the prompt's call, then the negative prompt's, each step. Cut off at step
    0 it gives the unguided images exactly; never cut off, the guided ones; in between, the
    negative prompt's call runs only before the cutoff."""
    from fixtures.families import FAMILIES

    from tgate_kernels.tools.micro.cfg_truncation import CFGTruncation

    family, steps = FAMILIES["flux"], 4
    pipe = family.build()
    guided_call = family.call_kwargs(steps)

    def run(cutoff=None, **changes):
        calls = []
        # the first layer the transformer runs: its pipeline still calls it, the truncation returns early
        handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            with torch.no_grad():
                if cutoff is None:
                    return pipe(**{**family.call_kwargs(steps), **changes}).images, len(calls)
                with CFGTruncation(pipe.transformer, cutoff, separate_calls=True) as truncation:
                    truncation.new_generation()
                    return pipe(**family.call_kwargs(steps)).images, len(calls)
        finally:
            handle.remove()

    guided, _ = run()
    unguided, _ = run(negative_prompt=None, true_cfg_scale=1.0)
    assert guided_call["true_cfg_scale"] > 1 and not torch.equal(guided, unguided)
    assert torch.equal(run(0)[0], unguided)
    assert torch.equal(run(steps)[0], guided)
    truncated, calls = run(2)
    assert calls == 2 * 2 + (steps - 2)
    assert not torch.equal(truncated, guided) and not torch.equal(truncated, unguided)
    assert "forward" not in pipe.transformer.__dict__


@pytest.mark.parametrize("variant", [cache.variant for cache in DIFFUSERS_CACHES if not cache.variant.startswith("FirstBlockCache")])
def test_each_scheduled_diffusers_cache_that_runs_on_flux_unguided_skips_work(variant):
    """On a FLUX pipeline (its transformer takes the timestep as a fraction, its pipeline opens
    cache contexts itself), called as the micro FLUX without guidance: a cache the harness does not
    refuse runs, and skips some of the transformer's work. (FirstBlockCache skips by how much the
    first block's output changed, which random weights never make small: the command test
    measures it on micro PixArt.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from fixtures.families import FAMILIES

    family = FAMILIES["flux"]
    cache = next(cache for cache in DIFFUSERS_CACHES if cache.variant == variant)
    unguided = {**family.call_kwargs(8), "negative_prompt": None, "true_cfg_scale": 1.0}

    def flops(pipe):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pipe(**unguided)
        return counter.get_total_flops()

    pipe = family.build()
    refused = cache.refuses(pipe, None)
    if refused is not None:
        assert "cross-attention" in refused, "only the cross-attention setting of PAB has nothing to do on FLUX"
        return
    # applied before the pipeline's first call, as the harness does (diffusers 0.42.1 lists the
    # hooks a cache context reaches at the first call)
    cache.apply(pipe)
    assert flops(pipe) < flops(family.build()), f"{variant} skipped nothing"


def test_an_unguided_micro_pipeline_gets_no_series_that_differs_only_in_its_guidance():
    assert (quality.guidance_of("sd"), quality.guidance_of("flux"), quality.guidance_of("flux-no-cfg")) == ("batched", "separate", None)
    names = [name for name, _, _ in quality._variants(quality.QualitySettings(gates=(4, 8)), 20, unet=False, guided=False)]
    assert names == ["gate 4", "gate 8", "auto"]


def test_auto_overhead_is_a_small_part_of_the_generation():
    overhead = quality.measure_auto_overhead("pixart", SMALL, generations=1)
    assert overhead.chooser_seconds > 0.0
    assert overhead.fraction < 0.1, "choosing the gate must not cost a tenth of the generation"


def test_quality_command_writes_the_table_and_plot(tmp_path, capsys):
    out = tmp_path / "quality"
    assert cli.main(["quality", "--models", "pixart", "--gates", "8", "--images-per-prompt", "1", "--prompts", "16",
                     "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pixart" in printed and "auto" in printed
    data = json.loads((out / "quality.json").read_text())
    assert {row["images"] for row in data["rows"]} == {16}, "16 prompts spread over the 48, one image each"
    # TaylorSeer is left out of a batched-guidance pipeline's table (one cache context for both parts)
    caches = [cache.variant for cache in DIFFUSERS_CACHES if not cache.variant.startswith("TaylorSeer")]
    assert [row["variant"] for row in data["rows"]] == ["ungated", "ungated, other seeds", "gate 8", "gate 8, prompt's own",
                                                        "gate 8, guidance kept", "auto", "CFG truncated at 8", *caches]
    assert "- pixart, gate 8: text frozen, guidance kept " in printed
    assert "CFG truncated at 8" in printed and "sp_interval=5, warm_up=2" in printed
    # diffusers' caches, applied to fresh pipelines, skip work; a higher threshold skips more
    by_variant = {row["variant"]: row for row in data["rows"]}
    assert all(by_variant[variant]["macs_ratio"] < 1.0 and by_variant[variant]["kind"] == "diffusers-cache" for variant in caches)
    first_block = [by_variant[f"FirstBlockCache {threshold}"]["macs_ratio"] for threshold in ("0.05", "0.1", "0.2")]
    assert first_block == sorted(first_block, reverse=True)
    assert f"{caches[0]} (" in printed, "each cache gets a verdict against T-GATE at its MACs"
    assert data["auto_overhead"][0]["model"] == "pixart"
    assert (out / "quality.png").stat().st_size > 0 and (out / "quality.md").read_text().count("pixart") >= 4


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--models", "sdxl"], "--models: sdxl not known"),
        (["--gates", "0"], "--gates: 0 must each be between 1 and 19"),
        (["--gates", "20"], "--gates: 20 must each be between 1 and 19"),
        (["--auto-gate", "threshold=-1"], "threshold"),
        (["--auto-gate", "min_fraction=0.7,max_fraction=0.5"], "must not exceed"),
        (["--auto-gate", "speed=3"], "unknown keys"),
        (["--sp-interval", "0"], "--sp-interval"),
        (["--warm-up", "-1"], "--warm-up"),
        (["--prompts", "49"], "--prompts: 49 is more than the 48 evaluation prompts"),
        (["--prompts", "0"], "--prompts"),
    ],
)
def test_quality_command_refuses_bad_options(arguments, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        cli.main(["quality", "--out", str(tmp_path / "never"), *arguments])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_diffusers_cache_that_cannot_run_on_a_micro_pipeline_says_why():
    from tgate_kernels.tools.micro.adherence import load_micro_pipeline

    refusals = {name: {cache.variant: cache.refuses(load_micro_pipeline(name), quality.guidance_of(name)) for cache in DIFFUSERS_CACHES}
                for name in ("pixart", "sd3")}
    taylorseer = ("TaylorSeer, every 2nd step", "TaylorSeer, every 4th step")
    assert not any(refused for variant, refused in refusals["pixart"].items() if variant not in taylorseer)
    # one cache context holds both guidance parts of a batched call: nothing to extrapolate per part
    assert all("one context" in refusals[name][variant] for name in refusals for variant in taylorseer)
    # SD3's last MMDiT block returns no text output, which diffusers' FirstBlockCache subtracts
    assert all("context_pre_only" in refusals["sd3"][f"FirstBlockCache {t}"] for t in ("0.05", "0.1", "0.2"))
    assert "no cross-attention" in refusals["sd3"]["PAB, attention 2nd, cross-attention 4th"]
    assert refusals["sd3"]["PAB, attention every 2nd step"] is None
