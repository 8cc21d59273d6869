"""``tgate-kernels eval``: two ``generate`` folders compared image by image."""

from __future__ import annotations

import argparse
import os

from . import arguments


def add_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="compare two generate folders image by image: PSNR, SSIM, FID, CLIP score",
        description="Match the images of two `generate` folders by prompt index, image and seed (e.g. an ungated and a "
                    "gated run of the same prompts) and report per-image and mean PSNR and SSIM, and FID and CLIP score "
                    "when their feature extractors are available locally.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("dir_a")
    evaluate.add_argument("dir_b")
    evaluate.add_argument("--clip-model", default=None, help="a local CLIP folder or a model id in the local Hugging Face cache")
    evaluate.add_argument("--device", type=arguments.device, default="auto")
    evaluate.add_argument("--out", default=None, help="folder for eval.json, eval.csv and eval.png (default: DIR_B/eval)")
    evaluate.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..evaluation import evaluate, render, write_report

    try:
        report = evaluate(args.dir_a, args.dir_b, clip_model=args.clip_model, device=args.device)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(render(report))
    paths = write_report(report, args.out or os.path.join(args.dir_b, "eval"))
    print("written: " + ", ".join(paths.values()))
    return 0
