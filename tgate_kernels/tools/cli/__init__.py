"""``tgate-kernels``: benchmark T-GATE on real architectures, generate with it, and evaluate.

    tgate-kernels bench                          # MACs, params, latency, Python calls -> bench/out/
    tgate-kernels generate --model ID_OR_DIR --prompts prompts.txt --out images/   # resumable
    accelerate launch -m tgate_kernels generate ...                                # data-parallel
    tgate-kernels eval plain/ gated/             # PSNR, SSIM, FID, CLIP score between two runs
    tgate-kernels compare  --model ID_OR_DIR --prompt "..." --gate-steps 5,10,15 --out grid.png
    tgate-kernels quality                        # adherence, PSNR, SSIM, FID, MACs on the micro world
    tgate-kernels train-micro --out DIR          # retrain the micro world's pipelines and classifier
    tgate-kernels serve --model micro-sd         # POST /v1/images/generations, step-batched, on Ray Serve
    tgate-kernels load-test                      # images/s, p50/p95 latency: request vs step batching

One module per command, each with ``add_parser(commands)`` and ``run(args, parser)``. ``bench``
builds its denoisers from the configs shipped in the package (random weights, nothing
downloaded); ``generate`` and ``compare`` load pipelines as diffusers does (a local folder, or a
Hub id downloaded when online unless ``--local-files-only``/``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import bench, compare, evaluate, generate, load_test, quality, serve, train_micro

_COMMANDS = (bench, generate, compare, evaluate, quality, serve, load_test, train_micro)

_OPTIONAL = {
    "skimage": ("scikit-image", "pip install 'tgate_kernels[bench]'"),
    "torchmetrics": ("torchmetrics", "pip install 'tgate_kernels[bench]'"),
    "matplotlib": ("matplotlib", "pip install 'tgate_kernels[bench]'"),
    "DeepCache": ("DeepCache", "pip install 'tgate_kernels[deepcache]'"),
    "torch_fidelity": ("torch-fidelity", "pip install torch-fidelity"),
    "ray": ("Ray Serve", "pip install 'tgate_kernels[serve]'"),
    "fastapi": ("FastAPI", "pip install 'tgate_kernels[serve]'"),
}
"""Optional packages some commands need, by import name, and how to install them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgate-kernels",
        description="T-GATE for diffusers pipelines: benchmarks on real architectures, and generation with local pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(commands)
    for sub in commands.choices.values():
        # errors found after parsing are the command's: they show its usage
        sub.set_defaults(command_parser=sub)
    return parser


def _version() -> str:
    from ... import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["train-micro"]:
        return train_micro.run(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command_parser = args.command_parser
    try:
        return args.handler(args, command_parser)
    except ModuleNotFoundError as error:
        missing = _OPTIONAL.get((error.name or "").split(".")[0])
        if missing is None:
            raise
        package, install = missing
        command_parser.error(f"this needs {package}, which is not installed: {install}")


if __name__ == "__main__":
    sys.exit(main())
