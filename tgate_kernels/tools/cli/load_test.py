"""``tgate-kernels load-test``: serving throughput and latency under Poisson arrivals."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import arguments


def add_parser(commands) -> None:
    load = commands.add_parser(
        "load-test",
        help="images/s and p50/p95 latency of one-at-a-time, request-batched and step-batched serving under Poisson load",
        description="Send Poisson arrivals at each rate to four servers in this process: one request at a time with "
                    "T-GATE, request-level batching with T-GATE, step-level batching without and with T-GATE, on the "
                    "SD-1.5 UNet (random weights) at a small latent size. Nothing is downloaded.",
        formatter_class=arguments.HelpFormatter,
    )
    load.add_argument("--rates", type=arguments.positive_float_list, default=[0.15, 0.3, 0.5], help="comma-separated arrival rates, requests/s")
    load.add_argument("--requests", type=arguments.positive_int, default=12, help="requests per rate and mode")
    load.add_argument("--steps", type=arguments.positive_int, default=10)
    load.add_argument("--gate-step", type=arguments.positive_int, default=4)
    load.add_argument("--latent-size", type=arguments.positive_int, default=8, help="latent height and width the UNet sees (SD-1.5 at 8: a 64 px image of its own VAE)")
    load.add_argument("--wait", type=float, default=0.5, help="request batching: seconds the first request waits for others")
    load.add_argument("--max-batch", type=arguments.positive_int, default=4, help="prompts a call (step batching: guided requests)")
    load.add_argument("--seed", type=arguments.non_negative_int, default=0)
    load.add_argument("--no-plot", dest="plot", action="store_false")
    load.add_argument("--out", default=os.path.join("bench", "out", "serving"), help="folder for serving.json, serving.md, serving.png")
    load.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..benchmarking.serving_load import LoadSettings, as_json, measure_load, render, write_plot

    if args.gate_step > args.steps:
        parser.error(f"argument --gate-step: {args.gate_step} is beyond the {args.steps} steps")
    if args.wait < 0:
        parser.error(f"argument --wait: must be >= 0 seconds, got {args.wait}")
    settings = LoadSettings(
        rates=tuple(args.rates), requests=args.requests, steps=args.steps, gate_step=args.gate_step,
        latent_size=args.latent_size, wait=args.wait, max_batch=args.max_batch, seed=args.seed,
    )
    results = measure_load(settings, progress=lambda message: print(message, file=sys.stderr, flush=True))
    text = render(results, settings)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, "serving.json"), os.path.join(args.out, "serving.md")]
    with open(written[0], "w") as handle:
        json.dump(as_json(results, settings), handle, indent=2)
        handle.write("\n")
    with open(written[1], "w") as handle:
        handle.write(text)
    if args.plot:
        written.append(os.path.join(args.out, "serving.png"))
        write_plot(results, written[-1])
    print("written: " + ", ".join(written))
    return 0
