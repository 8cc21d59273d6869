"""``tgate-kernels train-micro``: retrain the micro world's pipelines and classifier (its own
parser owns every option, ``--help`` included)."""

from __future__ import annotations

HELP = "train the micro world's pipelines and classifier (what tgate_kernels/tools/micro/weights holds)"


def add_parser(commands) -> None:
    # listed for --help only: main() hands train-micro's arguments to its own parser
    commands.add_parser("train-micro", help=HELP)


def run(arguments: list[str]) -> int:
    from ..micro.train import main as train_main

    return train_main(arguments)
