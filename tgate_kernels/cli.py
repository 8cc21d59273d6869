"""``tgate-kernels``: benchmark T-GATE on real architectures, and run it on local pipelines.

    tgate-kernels bench                          # MACs, params, latency, Python calls -> bench/out/
    tgate-kernels generate --model DIR --prompt "..." --out image.png
    tgate-kernels compare  --model DIR --prompt "..." --gate-steps 5,10,15 --out grid.png

Nothing is ever downloaded: ``bench`` builds its denoisers from the configs shipped in the
package (random weights), and ``generate``/``compare`` load pipelines with
``local_files_only=True`` (a local folder, or a model already in the Hugging Face cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

DEFAULT_OUT = os.path.join("bench", "out")
_DTYPES = ("auto", "float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------
# Argument types: each error names the value and what is allowed (argparse adds the option).
# ------------------------------------------------------------------------------------------


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        from .options import check_int

        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected an integer >= {minimum}") from None
        try:
            return check_int("value", value, minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= {minimum}") from None

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _resolution(text: str) -> int:
    value = _positive_int(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a multiple of 64 pixels (e.g. 64, 128, 256, 512)")
    return value


def _int_list(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected comma-separated integers >= 0, e.g. 5,10,15")
    return [_non_negative_int(item) for item in items]


def _name_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected comma-separated model names")
    return names


def _deepcache(text: str) -> dict:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not INTERVAL,BRANCH; expected e.g. 3,0")
    return {"cache_interval": _positive_int(parts[0]), "cache_branch_id": _non_negative_int(parts[1])}


def _device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine (no CUDA device); use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; expected auto, cpu, cuda or cuda:N")
    return str(device)


def _resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .benchmarking.architectures import architectures

    parser = argparse.ArgumentParser(
        prog="tgate-kernels",
        description="T-GATE for diffusers pipelines: benchmarks on real architectures, and generation with local pipelines.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
            "(when installed) timed alternately. The defaults finish in a few minutes on a 2-core CPU."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--models", type=_name_list, default=["all"], help=f"comma-separated models for the MACs/params table, or all ({models})")
    bench.add_argument("--latency-models", type=_name_list, default=["sd15"], help="comma-separated models to time, or none")
    bench.add_argument("--architectures", action="append", default=[], metavar="MANIFEST",
                       help="a benchmarks.json of more architectures (the format of tgate_kernels/configs/benchmarks.json, "
                            "configs beside it); may be given several times")
    bench.add_argument("--resolution", type=_resolution, default=128, help="image side in pixels for the latency runs (multiple of 64)")
    bench.add_argument("--steps", type=_positive_int, default=10, help="denoising steps of the latency runs")
    bench.add_argument(
        "--gate-steps",
        type=_int_list,
        default=None,
        help="comma-separated gate steps to time (each <= --steps); default: the published gate at the same fraction of the steps (10 of 25 -> 4 of 10)",
    )
    bench.add_argument("--repeats", type=_positive_int, default=2, help="timed calls per variant (after one warm-up call each)")
    bench.add_argument("--device", type=_device, default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    bench.add_argument("--dtype", choices=_DTYPES, default="auto", help="latency dtype; auto is float16 on CUDA, float32 on CPU")
    bench.add_argument("--no-reference", dest="reference", action="store_false", default=True,
                       help="do not time the reference `tgate` package (timed by default when installed)")
    bench.add_argument("--compile", action="store_true",
                       help="also time T-GATE's fast path with the denoiser under torch.compile (compiling takes "
                            "minutes on a CPU)")
    bench.add_argument("--no-python-calls", dest="python_calls", action="store_false", help="skip counting Python calls per step")
    bench.add_argument("--python-calls-model", default="sd15", help="the one model whose pipeline the Python calls per step are counted on (at 64 px)")
    bench.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG plot")
    bench.add_argument("--out", default=DEFAULT_OUT, help="output directory for bench.json, bench.csv, bench.txt and bench.png")
    bench.set_defaults(handler=_run_bench)

    for name, summary in (
        ("generate", "generate one image with T-GATE from a local pipeline"),
        ("compare", "the same prompt and seed with and without T-GATE, side by side, with PSNR/SSIM"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary + ". Nothing is downloaded.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--model", required=True, help="pipeline folder (save_pretrained layout) or a model id already in the local Hugging Face cache")
        sub.add_argument("--prompt", required=True)
        sub.add_argument("--negative-prompt", default=None)
        sub.add_argument("--steps", type=_positive_int, default=25, help="num_inference_steps")
        sub.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's default when not given")
        sub.add_argument("--height", type=_positive_int, default=None)
        sub.add_argument("--width", type=_positive_int, default=None)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--sp-interval", type=_positive_int, default=5)
        sub.add_argument("--fi-interval", type=_positive_int, default=1)
        sub.add_argument("--warm-up", type=_non_negative_int, default=2)
        sub.add_argument("--deepcache", type=_deepcache, default=None, metavar="INTERVAL,BRANCH", help="also run DeepCache, e.g. 3,0")
        sub.add_argument("--device", type=_device, default="auto")
        sub.add_argument("--dtype", choices=_DTYPES, default="auto")
        if name == "generate":
            sub.add_argument("--gate-step", type=_non_negative_int, default=10, help="step from which cross-attention is reused and CFG dropped")
            sub.add_argument("--out", default="image.png", help="PNG file to write")
            sub.set_defaults(handler=_run_generate)
        else:
            sub.add_argument("--gate-steps", type=_int_list, default=[10], help="comma-separated gate steps, one T-GATE image each")
            sub.add_argument("--out", default="compare.png", help="PNG grid to write")
            sub.set_defaults(handler=_run_compare)
    return parser


# ------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------


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


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tqdm.auto import tqdm

    from .benchmarking import report
    from .benchmarking.architectures import architectures
    from .benchmarking.suite import BenchOptions, planned_work, run_bench

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
    options = BenchOptions(
        models=models,
        latency_models=latency_models,
        resolution=args.resolution,
        steps=args.steps,
        gate_steps=args.gate_steps,
        repeats=args.repeats,
        device=args.device,
        dtype=_resolve_dtype(args.dtype, args.device),
        reference=args.reference,
        compile=args.compile,
        python_calls_model=python_calls_model,
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


# ------------------------------------------------------------------------------------------
# generate / compare
# ------------------------------------------------------------------------------------------


class ModelNotFound(RuntimeError):
    pass


def load_local_pipeline(model: str, device: str, dtype):
    """``DiffusionPipeline.from_pretrained(model, local_files_only=True)``; a missing model raises
    :class:`ModelNotFound` with a message saying where it was looked for."""
    import torch
    from diffusers import DiffusionPipeline

    try:
        # float32 is the default; asking for it only draws a deprecation warning on new diffusers.
        options = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True, **options)
    except (OSError, ValueError) as error:
        where = "folder" if os.path.isdir(model) else "local folder or the local Hugging Face cache"
        raise ModelNotFound(
            f"could not load a diffusers pipeline from {model!r} (looked in the {where}; nothing is downloaded): {error}"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _call_kwargs(args: argparse.Namespace) -> dict:
    import torch

    kwargs = dict(prompt=args.prompt, num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(args.seed))
    optional = dict(negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def _enable_kwargs(args: argparse.Namespace, gate_step: int) -> dict:
    kwargs = dict(gate_step=gate_step, sp_interval=args.sp_interval, fi_interval=args.fi_interval, warm_up=args.warm_up)
    if args.deepcache is not None:
        kwargs["deepcache"] = args.deepcache
    return kwargs


def _timed_image(pipe, kwargs: dict):
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(**kwargs).images[0]
    return image, time.perf_counter() - start


def _prepare(args: argparse.Namespace, parser: argparse.ArgumentParser, gate_steps: list[int]):
    from . import api

    if max(gate_steps) > args.steps:
        option = "--gate-step" if args.command == "generate" else "--gate-steps"
        parser.error(f"argument {option}: {max(gate_steps)} is larger than --steps {args.steps}; a gate step must be between 0 and the steps")

    try:
        pipe = load_local_pipeline(args.model, args.device, _resolve_dtype(args.dtype, args.device))
    except ModelNotFound as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    try:
        # Validates the pipeline (a denoiser with cross-attention) before anything runs.
        api.enable(pipe, **_enable_kwargs(args, gate_steps[0]))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: argument --model: {error}\n")
    api.disable(pipe)
    return pipe


def _run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import api

    pipe = _prepare(args, parser, [args.gate_step])
    api.enable(pipe, **_enable_kwargs(args, args.gate_step))
    image, seconds = _timed_image(pipe, _call_kwargs(args))
    _save(image, args.out)
    print(f"T-GATE (gate_step={args.gate_step}, {args.steps} steps): {seconds:.2f} s -> {args.out} ({image.width}x{image.height})")
    return 0


def _run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import api
    from .benchmarking.fidelity import fidelity, labelled_grid

    pipe = _prepare(args, parser, args.gate_steps)
    baseline, baseline_s = _timed_image(pipe, _call_kwargs(args))
    tiles = [(baseline, f"baseline, {args.steps} steps", f"{baseline_s:.2f} s")]
    rows = [("baseline", "-", f"{baseline_s:.2f}", "inf", "1.0000")]
    for gate_step in args.gate_steps:
        api.enable(pipe, **_enable_kwargs(args, gate_step))
        try:
            image, seconds = _timed_image(pipe, _call_kwargs(args))
        finally:
            api.disable(pipe)
        psnr, ssim = fidelity(baseline, image)
        tiles.append((image, f"T-GATE gate {gate_step}", f"{seconds:.2f} s  PSNR {psnr:.1f}  SSIM {ssim:.3f}"))
        rows.append(("T-GATE", str(gate_step), f"{seconds:.2f}", f"{psnr:.2f}", f"{ssim:.4f}"))
    grid = labelled_grid(tiles)
    _save(grid, args.out)
    from .benchmarking.report import format_table

    print(format_table(["variant", "gate", "seconds", "PSNR dB", "SSIM"], rows))
    print(f"fidelity against the image without T-GATE (same prompt and seed); grid -> {args.out} ({grid.width}x{grid.height})")
    return 0


def _save(image, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    image.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
