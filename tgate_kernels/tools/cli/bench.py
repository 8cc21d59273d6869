"""``tgate-kernels bench``: MACs, params, latency, peak memory and Python calls per step of
T-GATE against the plain pipeline, on real architectures built from shipped configs."""

from __future__ import annotations

import argparse
import os
import sys

from . import arguments

DEFAULT_OUT = os.path.join("bench", "out")


def add_parser(commands) -> None:
    from ..benchmarking.architectures import architectures

    models = ", ".join(architectures())
    bench = commands.add_parser(
        "bench",
        help="MACs, params, latency, peak memory and Python calls per step of T-GATE vs the plain pipeline",
        description=(
            "Benchmark T-GATE on real architectures built from the configs shipped in the package, with random "
            "weights (nothing is downloaded). MACs and params: every model in --models at the published table's "
            "settings (SD/SDXL 25 steps, gate 10; PixArt 25 steps, gate 8; LCM 4 steps, gate 1; SDXL+DeepCache "
            "interval 3, branch 0), counted on the meta device, next to the published table. Latency and peak memory: "
            "the --latency-models at --resolution/--steps, baseline, T-GATE and the reference `tgate` package "
            "(when installed) timed alternately, then the T-GATE/baseline ratio across --resolutions. The defaults take about "
            "10 minutes on a 2-core CPU (4 more for the MACs of SD3.5 Large, FLUX.1-dev and Qwen-Image); adding 512 to --resolutions adds about 11."
        ),
        formatter_class=arguments.HelpFormatter,
    )
    bench.add_argument("--models", type=arguments.name_list, default=["all"], help=f"comma-separated models for the MACs/params table, or all ({models})")
    bench.add_argument("--latency-models", type=arguments.name_list, default=["sd15"], help="comma-separated models to time, or none")
    bench.add_argument("--architectures", action="append", default=[], metavar="MANIFEST",
                       help="a benchmarks.json of more architectures (the format of tgate_kernels/tools/benchmarking/configs/benchmarks.json, "
                            "configs beside it); may be given several times")
    bench.add_argument("--resolution", type=arguments.resolution, default=256, help="image side in pixels of the latency run that times every variant (multiple of 64)")
    bench.add_argument("--resolutions", type=arguments.resolution_list, default=[128, 256],
                       help="image sides of the resolution sweep (baseline vs T-GATE, next to the MACs prediction), e.g. 128,256,512, or none")
    bench.add_argument("--steps", type=arguments.positive_int, default=10, help="denoising steps of the latency runs")
    bench.add_argument(
        "--gate-steps",
        type=arguments.int_list,
        default=None,
        help="comma-separated gate steps to time (each <= --steps); default: the published gate at the same fraction of the steps (10 of 25 -> 4 of 10)",
    )
    bench.add_argument("--repeats", type=arguments.positive_int, default=2, help="timed calls per variant (after one warm-up call each)")
    bench.add_argument("--device", type=arguments.device, default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    bench.add_argument("--dtype", choices=arguments.DTYPES, default="auto",
                       help="latency dtype; auto is what a user would run: float16 on CUDA; on a CPU bfloat16 where it is "
                            "measured faster than float32 here (with AMX), float32 otherwise")
    bench.add_argument("--no-reference", dest="reference", action="store_false", default=True,
                       help="do not time the reference `tgate` package (timed by default when installed)")
    bench.add_argument("--compile", action="store_true",
                       help="also time tgate_kernels.enable(pipe, compile=True) (compiling takes minutes on a CPU; its "
                            "time and memory are reported as the first call's)")
    bench.add_argument("--no-python-calls", dest="python_calls", action="store_false", help="skip counting Python calls per step")
    bench.add_argument("--python-calls-model", default="sd15", help="the one model whose pipeline the Python calls per step are counted on (at 64 px)")
    bench.add_argument("--throughput", type=arguments.int_list, default=[], metavar="PROMPTS",
                       help="comma-separated batches of prompts (e.g. 1,4,8) whose images per second the denoiser gives, "
                            "baseline against eager T-GATE, at --resolution/--steps (none by default: a batch of 8 at 256 px "
                            "takes minutes on a CPU)")
    bench.add_argument("--throughput-model", default="sd15", help="the model whose throughput --throughput measures")
    bench.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG plot")
    bench.add_argument("--out", default=DEFAULT_OUT, help="output directory for bench.json, bench.csv, bench.txt and bench.png")
    bench.set_defaults(handler=run)


def _models(option: str, names: list[str], known: dict, parser: argparse.ArgumentParser, allow_none: bool = False) -> list[str]:
    if names == ["all"]:
        return list(known)
    if allow_none and names == ["none"]:
        return []
    unknown = [name for name in names if name not in known]
    if unknown:
        choices = ", ".join(known) + ", all" + (", none" if allow_none else "")
        parser.error(f"argument {option}: unknown model {', '.join(map(repr, unknown))}; choose from {choices}")
    return names


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm.auto import tqdm

    from ..benchmarking import report
    from ..benchmarking.architectures import architectures
    from ..benchmarking.suite import BenchOptions, planned_work, run_bench

    extra = tuple(os.path.abspath(path) for path in args.architectures)
    for path in extra:
        if not os.path.isfile(path):
            parser.error(f"argument --architectures: {path!r} is not a file; expected a benchmarks.json manifest")
    known = architectures(extra)
    models = _models("--models", args.models, known, parser)
    latency_models = _models("--latency-models", args.latency_models, known, parser, allow_none=True)
    python_calls_model = None
    if args.python_calls:
        if args.python_calls_model not in known:
            parser.error(
                f"argument --python-calls-model: {args.python_calls_model!r} is not one model; choose one of {', '.join(known)}"
            )
        python_calls_model = args.python_calls_model
    if args.gate_steps and max(args.gate_steps) > args.steps:
        parser.error(f"argument --gate-steps: {max(args.gate_steps)} is larger than --steps {args.steps}; each gate step must be between 0 and the steps")
    for name in latency_models:
        if not known[name].timeable:
            parser.error(f"argument --latency-models: {name!r} is a MACs-only row; time one of the plain models instead")
    if args.throughput and args.throughput_model not in known:
        parser.error(f"argument --throughput-model: {args.throughput_model!r} is not one model; choose one of {', '.join(known)}")
    if any(prompts < 1 for prompts in args.throughput):
        parser.error(f"argument --throughput: {args.throughput} has a batch below 1 prompt; give positive counts such as 1,4,8")
    timed = bool(latency_models or args.throughput)
    # the dtype is chosen by timing this CPU, which only a run that times anything needs
    dtype, dtype_reason = arguments.resolve_dtype_with_reason(args.dtype, args.device, fast_cpu_dtype=timed)
    if timed:
        print(f"latency dtype: {dtype_reason}", file=sys.stderr, flush=True)
    options = BenchOptions(
        models=models,
        latency_models=latency_models,
        resolution=args.resolution,
        steps=args.steps,
        gate_steps=args.gate_steps,
        repeats=args.repeats,
        device=args.device,
        dtype=dtype,
        dtype_reason=dtype_reason,
        reference=args.reference,
        compile=args.compile,
        resolutions=args.resolutions,
        python_calls_model=python_calls_model,
        throughput_model=args.throughput_model if args.throughput else None,
        throughput_prompts=args.throughput,
        extra_manifests=extra,
    )
    with tqdm(total=planned_work(options), desc="bench", unit="task", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message[:60])
            bar.update(1)

        results = run_bench(options, progress)
    print(report.render(results))
    paths = report.write_all(results, args.out, plot=args.plot)
    print("\nwritten: " + ", ".join(paths[k] for k in ("table", "json", "csv", "png") if k in paths))
    return 0
