"""``tgate-kernels serve``: an OpenAI-style image endpoint with step-level batching on Ray Serve."""

from __future__ import annotations

import argparse
import time

from . import arguments


def add_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve POST /v1/images/generations with step-level batching and a gate per request, on Ray Serve",
        description="Start Ray (or join the cluster at RAY_ADDRESS) and serve a Stable Diffusion pipeline with one step "
                    "batcher per replica: requests join the running batch at the next denoising step and each is gated "
                    "by its own gate_step. Endpoints: POST /v1/images/generations, GET /health, GET /metrics.",
        formatter_class=arguments.HelpFormatter,
    )
    serve.add_argument("--model", required=True,
                       help="micro-sd (the shipped micro pipeline), or a Stable Diffusion 1.x/2.x, SDXL or PixArt pipeline "
                            "folder or Hub id")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=arguments.positive_int, default=8000)
    serve.add_argument("--replicas", type=arguments.positive_int, default=1, help="replicas (one GPU each where there are GPUs)")
    serve.add_argument("--max-rows", type=arguments.positive_int, default=16, help="denoiser rows of one step-batched call")
    serve.add_argument("--max-queued", type=arguments.non_negative_int, default=64, help="requests waiting per replica before 429")
    serve.add_argument("--steps", type=arguments.positive_int, default=None, help="a request's default num_inference_steps (micro-sd: 20, else 25)")
    serve.add_argument("--guidance-scale", type=float, default=None, help="a request's default guidance_scale (micro-sd: 4.0, else 7.5)")
    serve.add_argument("--gate-step", type=arguments.gate_step_or_none, default=0.4,
                       help="default gate_step of a request: a step, a fraction of the steps, or none")
    serve.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.max_rows < 2:
        parser.error(f"argument --max-rows: must be at least 2 (a guided request takes two rows), got {args.max_rows}")
    import ray
    from ray import serve

    from ...serving.ray_app import ServerOptions, application

    micro = args.model == "micro-sd"
    model = args.model
    if micro:
        from ..micro.adherence import WEIGHTS

        model = str(WEIGHTS / "sd")
    options = ServerOptions(
        model=model, replicas=args.replicas, max_rows=args.max_rows, max_queued=args.max_queued,
        steps=args.steps or (20 if micro else 25),
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else (4.0 if micro else 7.5),
        gate_step=args.gate_step, dtype=args.dtype,
    )
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(options), name="tgate", route_prefix="/")
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1/images/generations", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
        return 130
