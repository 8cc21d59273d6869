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
        formatter_class=arguments.HelpFormatter,
    )
    evaluate.add_argument("dir_a")
    evaluate.add_argument("dir_b")
    evaluate.add_argument("--clip-model", default=None, help="a local CLIP folder or a model id in the local Hugging Face cache")
    evaluate.add_argument("--fid-features", type=_fid_features, default=None, metavar="LAYER|micro|WEIGHTS",
                          help="FID's features: an InceptionV3 layer (64, 192, 768 or 2048; default 2048, its weights "
                               "downloaded by torch-fidelity on first use), a local file of those weights, or micro (the "
                               "micro world's classifier, shipped)")
    evaluate.add_argument("--device", type=arguments.device, default="auto")
    evaluate.add_argument("--out", default=None, help="folder for eval.md, eval.json, eval.csv and eval.png (default: DIR_B/eval)")
    evaluate.set_defaults(handler=run)


def _fid_features(text: str) -> tuple:
    """(features, weights file) for ``evaluate``."""
    from ..evaluation import INCEPTION_FEATURES

    if text == "micro":
        return "micro", None
    if text.isdigit():
        if int(text) not in INCEPTION_FEATURES:
            raise argparse.ArgumentTypeError(f"{text} is not an InceptionV3 layer; expected one of {INCEPTION_FEATURES}")
        return int(text), None
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a layer ({INCEPTION_FEATURES}), micro, nor a weights file")
    return None, text


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..evaluation import evaluate, render, write_report

    features, weights = args.fid_features or (None, None)
    if features == "micro":
        from ..micro.adherence import load_classifier
        from ..micro.quality import ClassifierFeatures

        features = ClassifierFeatures(load_classifier())
    try:
        report = evaluate(args.dir_a, args.dir_b, clip_model=args.clip_model, device=args.device, fid_features=features,
                          fid_weights=weights)
    except ValueError as error:
        parser.error(str(error))
    print(render(report))
    paths = write_report(report, args.out or os.path.join(args.dir_b, "eval"))
    print("written: " + ", ".join(paths.values()))
    return 0
