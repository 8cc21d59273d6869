"""``tgate-kernels compare``: one prompt and seed with and without T-GATE, side by side."""

from __future__ import annotations

import argparse
import os
import time

from . import arguments

SUMMARY = "the same prompt and seed with and without T-GATE, side by side, with PSNR/SSIM"


def add_parser(commands) -> None:
    sub = commands.add_parser("compare", help=SUMMARY, description=SUMMARY + ".", formatter_class=arguments.HelpFormatter)
    sub.add_argument("--prompt", required=True)
    arguments.add_pipeline_options(sub)
    sub.add_argument("--gate-steps", type=arguments.int_list, default=[10], help="comma-separated gate steps, one T-GATE image each")
    sub.add_argument("--out", default="compare.png", help="PNG grid to write")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ... import api
    from ..benchmarking.fidelity import fidelity, labelled_grid
    from ..benchmarking.report import format_table

    if os.path.isdir(args.out) or os.path.splitext(args.out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        parser.error(f"argument --out: {args.out!r} is not an image file to write; expected a .png, .jpg or .webp path")
    configs = [arguments.tgate_config(args, parser, gate) for gate in args.gate_steps]
    pipe = arguments.load_or_exit(args, parser, args.device or arguments.device("auto"))
    arguments.enable_or_exit(pipe, args, parser, configs[0])
    api.disable(pipe)
    baseline, baseline_s = _timed_image(pipe, _prompt_kwargs(args))
    tiles = [(baseline, f"baseline, {args.steps} steps", f"{baseline_s:.2f} s")]
    rows = [("baseline", "-", f"{baseline_s:.2f}", "inf", "1.0000")]
    for config in configs:
        api.enable(pipe, config=config)
        try:
            image, seconds = _timed_image(pipe, _prompt_kwargs(args))
        finally:
            api.disable(pipe)
        psnr, ssim = fidelity(baseline, image)
        tiles.append((image, f"T-GATE gate {config.gate_step}", f"{seconds:.2f} s  PSNR {psnr:.1f}  SSIM {ssim:.3f}"))
        rows.append(("T-GATE", str(config.gate_step), f"{seconds:.2f}", f"{psnr:.2f}", f"{ssim:.4f}"))
    grid = labelled_grid(tiles)
    arguments.save_image(grid, args.out)
    print(format_table(["variant", "gate", "seconds", "PSNR dB", "SSIM"], rows))
    print(f"fidelity against the image without T-GATE (same prompt and seed); grid -> {args.out} ({grid.width}x{grid.height})")
    return 0


def _prompt_kwargs(args: argparse.Namespace) -> dict:
    import torch

    kwargs = dict(arguments.call_kwargs(args), prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs


def _timed_image(pipe, kwargs: dict):
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(**kwargs).images[0]
    return image, time.perf_counter() - start
