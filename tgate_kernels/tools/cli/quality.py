"""``tgate-kernels quality``: image quality of T-GATE on the micro world's trained pipelines."""

from __future__ import annotations

import argparse
import os
import sys

from . import arguments


def add_parser(commands) -> None:
    quality = commands.add_parser(
        "quality",
        help="image quality of T-GATE on the micro world's trained pipelines: adherence, PSNR, SSIM, FID, MACs",
        description="Generate the micro world's evaluation prompts with the shipped micro pipelines without T-GATE and "
                    "with fixed gates, fixed gates with DeepCache, gate_step=auto, CFG truncation at the same gates and diffusers' own caches, and report prompt adherence (read "
                    "back by the micro classifier), PSNR and SSIM against the ungated images, FID on the classifier's "
                    "features and the MACs ratio, with a Pareto plot. Nothing is downloaded.",
        formatter_class=arguments.HelpFormatter,
    )
    quality.add_argument("--models", type=arguments.name_list, default=["sd", "pixart", "sd3", "flux", "flux-no-cfg"],
                         help="comma-separated micro pipelines: sd, pixart, sd3, flux (true CFG), flux-no-cfg (the same weights unguided)")
    quality.add_argument("--gates", type=arguments.int_list, default=None, help="comma-separated fixed gate steps of the 20 (default 2,4,...,16)")
    quality.add_argument("--images-per-prompt", type=arguments.positive_int, default=4, help="seeds per evaluation prompt (48 prompts)")
    quality.add_argument("--prompts", type=arguments.positive_int, default=None,
                         help="evaluate on this many of the 48 evaluation prompts, evenly spread over them (a quick look; default all)")
    quality.add_argument("--batch-size", type=arguments.positive_int, default=8, help="images per pipeline call (auto decides once per call)")
    quality.add_argument("--seed", type=arguments.non_negative_int, default=0)
    quality.add_argument("--auto-gate", type=arguments.auto_gate, default=None, metavar="KEY=VALUE,...", help="auto_gate options")
    quality.add_argument("--no-deepcache", dest="deepcache", action="store_false", help="skip the DeepCache series")
    quality.add_argument("--no-cfg-truncation", dest="cfg_truncation", action="store_false",
                         help="skip the CFG-truncation series (guidance dropped at each gate, nothing cached)")
    quality.add_argument("--sp-interval", type=arguments.positive_int, default=5,
                         help="T-GATE's self-attention (and joint-attention) caching interval before the gate, in every variant")
    quality.add_argument("--warm-up", type=arguments.non_negative_int, default=2,
                         help="steps before self-attention is first cached, in every variant")
    quality.add_argument("--no-prompt-part", dest="prompt_part", action="store_false",
                         help="skip the series keeping the prompt's part after the gate with its own cached outputs "
                              "(kept_part=conditional, gate_cache=kept-part)")
    quality.add_argument("--no-guidance-kept", dest="guidance_kept", action="store_false",
                         help="skip the series freezing the text at the gate with the guidance kept after it "
                              "(guidance_after_gate=kept)")
    quality.add_argument("--no-diffusers-caches", dest="diffusers_caches", action="store_false",
                         help="skip diffusers' own caches (FirstBlockCache, Pyramid Attention Broadcast, TaylorSeer) on the transformers")
    quality.add_argument("--no-plot", dest="plot", action="store_false")
    quality.add_argument("--out", default=os.path.join("bench", "out", "quality"), help="folder for quality.json, quality.md, quality.png")
    quality.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..micro.adherence import MICRO_CALL
    from ..micro.quality import DEFAULT_GATES, QualitySettings, measure_auto_overhead, measure_quality
    from ..micro.quality_report import render, write_all
    from ..micro.world import EVAL_PROMPTS

    unknown = [name for name in args.models if name not in MICRO_CALL]
    if unknown:
        parser.error(f"argument --models: {', '.join(unknown)} not known; expected a comma-separated subset of {', '.join(MICRO_CALL)}")
    steps = min(MICRO_CALL[name]["num_inference_steps"] for name in args.models)
    gates = tuple(args.gates) if args.gates is not None else DEFAULT_GATES
    if not all(0 < gate < steps for gate in gates):
        parser.error(f"argument --gates: {','.join(map(str, gates))} must each be between 1 and {steps - 1} (the micro pipelines run {steps} steps)")
    if args.prompts is not None and args.prompts > len(EVAL_PROMPTS):
        parser.error(f"argument --prompts: {args.prompts} is more than the {len(EVAL_PROMPTS)} evaluation prompts")
    count = args.prompts or len(EVAL_PROMPTS)
    prompts = tuple(EVAL_PROMPTS[index * len(EVAL_PROMPTS) // count] for index in range(count))
    settings = QualitySettings(gates=gates, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, prompts=prompts,
                               seed=args.seed, deepcache=args.deepcache, cfg_truncation=args.cfg_truncation,
                               prompt_part=args.prompt_part, guidance_kept=args.guidance_kept,
                               diffusers_caches=args.diffusers_caches,
                               sp_interval=args.sp_interval, warm_up=args.warm_up,
                               auto_gate=args.auto_gate)
    rows, overheads = [], []
    for name in args.models:
        rows += measure_quality(name, settings, progress=lambda message: print(message, file=sys.stderr, flush=True))
        overheads.append(measure_auto_overhead(name, settings))
    print(render(rows, overheads, settings))
    print("written: " + ", ".join(write_all(rows, overheads, settings, args.out, plot=args.plot).values()))
    return 0
