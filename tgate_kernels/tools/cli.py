"""``tgate-kernels``: benchmark T-GATE on real architectures, generate with it, and evaluate.

    tgate-kernels bench                          # MACs, params, latency, Python calls -> bench/out/
    tgate-kernels generate --model ID_OR_DIR --prompts prompts.txt --out images/   # resumable
    accelerate launch -m tgate_kernels generate ...                                # data-parallel
    tgate-kernels eval plain/ gated/             # PSNR, SSIM, FID, CLIP score between two runs
    tgate-kernels compare  --model ID_OR_DIR --prompt "..." --gate-steps 5,10,15 --out grid.png
    tgate-kernels quality                        # adherence, PSNR, SSIM, FID, MACs on the micro world
    tgate-kernels train-micro --out DIR          # retrain the micro world's pipelines and classifier

``bench`` builds its denoisers from the configs shipped in the package (random weights, nothing
downloaded); ``generate`` and ``compare`` load pipelines as diffusers does (a local folder, or a
Hub id downloaded when online unless ``--local-files-only``/``HF_HUB_OFFLINE=1``).
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
        from ..config import check_int

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


def _gate_step(text: str) -> int | float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected an int step >= 0, a fraction in (0, 1) or auto") from None
    if value.is_integer() and "." not in text:
        return _non_negative_int(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; expected an int step >= 0, a fraction in (0, 1) or auto")
    return value


def _resolution_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    return [_resolution(item.strip()) for item in text.split(",") if item.strip()]


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


def _auto_gate(text: str) -> dict:
    from ..api import auto_gate_option

    option = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, equals, value = item.partition("=")
        if not equals:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE; expected e.g. threshold=0.08,min_fraction=0.2,max_fraction=0.6,patience=2")
        integer = key.strip() == "patience"
        try:
            option[key.strip()] = int(value) if integer else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: {value!r} is not {'an integer' if integer else 'a number'}") from None
    try:
        auto_gate_option(option)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return option


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


def _resolve_dtype(name: str, device: str, fast_cpu_dtype: bool = False):
    """``auto``: float16 on CUDA; on a CPU float32, or with ``fast_cpu_dtype`` (benchmarks: what a
    user after speed would run) bfloat16 where the CPU has native bfloat16 (AVX512-BF16 or AMX)."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.float16
    if not fast_cpu_dtype:
        return torch.float32
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else torch.float32


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
            "(when installed) timed alternately, then the T-GATE/baseline ratio across --resolutions. The defaults take about "
            "10 minutes on a 2-core CPU; adding 512 to --resolutions adds about 11."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--models", type=_name_list, default=["all"], help=f"comma-separated models for the MACs/params table, or all ({models})")
    bench.add_argument("--latency-models", type=_name_list, default=["sd15"], help="comma-separated models to time, or none")
    bench.add_argument("--architectures", action="append", default=[], metavar="MANIFEST",
                       help="a benchmarks.json of more architectures (the format of tgate_kernels/tools/benchmarking/configs/benchmarks.json, "
                            "configs beside it); may be given several times")
    bench.add_argument("--resolution", type=_resolution, default=256, help="image side in pixels of the latency run that times every variant (multiple of 64)")
    bench.add_argument("--resolutions", type=_resolution_list, default=[128, 256],
                       help="image sides of the resolution sweep (baseline vs T-GATE, next to the MACs prediction), e.g. 128,256,512, or none")
    bench.add_argument("--steps", type=_positive_int, default=10, help="denoising steps of the latency runs")
    bench.add_argument(
        "--gate-steps",
        type=_int_list,
        default=None,
        help="comma-separated gate steps to time (each <= --steps); default: the published gate at the same fraction of the steps (10 of 25 -> 4 of 10)",
    )
    bench.add_argument("--repeats", type=_positive_int, default=2, help="timed calls per variant (after one warm-up call each)")
    bench.add_argument("--device", type=_device, default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    bench.add_argument("--dtype", choices=_DTYPES, default="auto",
                       help="latency dtype; auto is what a user would run: float16 on CUDA, bfloat16 on a CPU with native "
                            "bfloat16 (AVX512-BF16 or AMX), float32 otherwise")
    bench.add_argument("--no-reference", dest="reference", action="store_false", default=True,
                       help="do not time the reference `tgate` package (timed by default when installed)")
    bench.add_argument("--compile", action="store_true",
                       help="also time tgate_kernels.enable(pipe, compile=True) (compiling takes minutes on a CPU; its "
                            "time and memory are reported as the first call's)")
    bench.add_argument("--no-python-calls", dest="python_calls", action="store_false", help="skip counting Python calls per step")
    bench.add_argument("--python-calls-model", default="sd15", help="the one model whose pipeline the Python calls per step are counted on (at 64 px)")
    bench.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG plot")
    bench.add_argument("--out", default=DEFAULT_OUT, help="output directory for bench.json, bench.csv, bench.txt and bench.png")
    bench.set_defaults(handler=_run_bench)

    for name, summary in (
        ("generate", "generate images with T-GATE: one prompt, or a prompts file into a folder (resumable, "
                     "data-parallel under `accelerate launch -m tgate_kernels generate ...`)"),
        ("compare", "the same prompt and seed with and without T-GATE, side by side, with PSNR/SSIM"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("--model", required=True,
                         help="a pipeline folder (save_pretrained layout) or a Hugging Face Hub id, downloaded when online as "
                              "from_pretrained does")
        sub.add_argument("--local-files-only", action="store_true", help="never download (HF_HUB_OFFLINE=1 does the same)")
        sub.add_argument("--variant", default=None, help="the weights variant to load, e.g. fp16")
        prompts = sub.add_mutually_exclusive_group(required=True)
        prompts.add_argument("--prompt")
        if name == "generate":
            prompts.add_argument("--prompts", metavar="FILE",
                                 help="a text file (one prompt a line) or JSON Lines (.jsonl: prompt, negative_prompt, seed, "
                                      "any pipeline argument)")
        sub.add_argument("--negative-prompt", default=None, help="for prompts that give none")
        sub.add_argument("--steps", type=_positive_int, default=25, help="num_inference_steps")
        sub.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's default when not given")
        sub.add_argument("--height", type=_positive_int, default=None)
        sub.add_argument("--width", type=_positive_int, default=None)
        sub.add_argument("--seed", type=_non_negative_int, default=0, help="base seed (see README: every image's seed follows from its place)")
        sub.add_argument("--sp-interval", type=_positive_int, default=5)
        sub.add_argument("--fi-interval", type=_positive_int, default=1)
        sub.add_argument("--warm-up", type=_non_negative_int, default=2)
        sub.add_argument("--deepcache", type=_deepcache, default=None, metavar="INTERVAL,BRANCH", help="also run DeepCache, e.g. 3,0")
        sub.add_argument("--device", type=_device, default=None,
                         help="auto, cpu, cuda or cuda:N (default: the process's device under accelerate, else cuda when present)")
        sub.add_argument("--dtype", choices=_DTYPES, default="auto", help="auto: float16 on CUDA, float32 on CPU")
        if name == "generate":
            sub.add_argument("--gate-step", type=_gate_step, default=10,
                             help="an int step, a float fraction of the steps (0.4), or auto (chosen per batch; the metadata "
                                  "records the step chosen)")
            sub.add_argument("--auto-gate", type=_auto_gate, default=None, metavar="KEY=VALUE,...",
                             help="how --gate-step auto chooses, e.g. threshold=0.08,min_fraction=0.2,max_fraction=0.6,patience=2")
            sub.add_argument("--no-tgate", dest="tgate", action="store_false", help="the plain pipeline: the baseline set")
            sub.add_argument("--compile", action="store_true", help="tgate_kernels.enable(pipe, compile=True)")
            sub.add_argument("--batch-size", type=_positive_int, default=1, help="images per pipeline call")
            sub.add_argument("--images-per-prompt", type=_positive_int, default=1)
            sub.add_argument("--out", default="images", help="a folder (images, metadata.jsonl, run.json), or a .png file for one image")
            sub.set_defaults(handler=_run_generate)
        else:
            sub.add_argument("--gate-steps", type=_int_list, default=[10], help="comma-separated gate steps, one T-GATE image each")
            sub.add_argument("--out", default="compare.png", help="PNG grid to write")
            sub.set_defaults(handler=_run_compare)

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
    evaluate.add_argument("--device", type=_device, default="auto")
    evaluate.add_argument("--out", default=None, help="folder for eval.json, eval.csv and eval.png (default: DIR_B/eval)")
    evaluate.set_defaults(handler=_run_eval)

    quality = commands.add_parser(
        "quality",
        help="image quality of T-GATE on the micro world's trained pipelines: adherence, PSNR, SSIM, FID, MACs",
        description="Generate the micro world's evaluation prompts with the shipped micro pipelines without T-GATE and "
                    "with fixed gates, fixed gates with DeepCache and gate_step=auto, and report prompt adherence (read "
                    "back by the micro classifier), PSNR and SSIM against the ungated images, FID on the classifier's "
                    "features and the MACs ratio, with a Pareto plot. Nothing is downloaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    quality.add_argument("--models", type=_name_list, default=["sd", "pixart"], help="comma-separated micro pipelines: sd, pixart")
    quality.add_argument("--gates", type=_int_list, default=None, help="comma-separated fixed gate steps of the 20 (default 2,4,...,16)")
    quality.add_argument("--images-per-prompt", type=_positive_int, default=4, help="seeds per evaluation prompt (48 prompts)")
    quality.add_argument("--batch-size", type=_positive_int, default=8, help="images per pipeline call (auto decides once per call)")
    quality.add_argument("--seed", type=_non_negative_int, default=0)
    quality.add_argument("--auto-gate", type=_auto_gate, default=None, metavar="KEY=VALUE,...", help="auto_gate options")
    quality.add_argument("--no-deepcache", dest="deepcache", action="store_false", help="skip the DeepCache series")
    quality.add_argument("--no-plot", dest="plot", action="store_false")
    quality.add_argument("--out", default=os.path.join("bench", "out", "quality"), help="folder for quality.json, quality.md, quality.png")
    quality.set_defaults(handler=_run_quality)

    # listed for --help only: main() hands train-micro's arguments to its own parser
    commands.add_parser("train-micro", help="train the micro world's pipelines and classifier (what tgate_kernels/tools/micro/weights holds)")
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
        dtype=_resolve_dtype(args.dtype, args.device, fast_cpu_dtype=True),
        reference=args.reference,
        compile=args.compile,
        resolutions=args.resolutions,
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


def _load(args: argparse.Namespace, parser: argparse.ArgumentParser, device: str):
    from .jobs.loading import ModelUnavailable, load_pipeline

    try:
        return load_pipeline(args.model, device=device, dtype=_resolve_dtype(args.dtype, device), variant=args.variant,
                             local_files_only=args.local_files_only)
    except ModelUnavailable as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


def _call_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(num_inference_steps=args.steps)
    optional = dict(guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def _enable_kwargs(args: argparse.Namespace, gate_step) -> dict:
    kwargs = dict(gate_step=gate_step, sp_interval=args.sp_interval, fi_interval=args.fi_interval, warm_up=args.warm_up)
    if args.deepcache is not None:
        kwargs["deepcache"] = args.deepcache
    if getattr(args, "compile", False):
        kwargs["compile"] = True
    if gate_step == "auto" and getattr(args, "auto_gate", None):
        kwargs["auto_gate"] = args.auto_gate
    return kwargs


def _check_gate_steps(args: argparse.Namespace, parser: argparse.ArgumentParser, gate_steps: list) -> None:
    option = "--gate-step" if args.command == "generate" else "--gate-steps"
    steps = [gate for gate in gate_steps if isinstance(gate, int)]
    largest = max(steps, default=0)
    if largest > args.steps:
        parser.error(f"argument {option}: {largest} is larger than --steps {args.steps}; a gate step must be between 0 and the steps")


def _enable_or_exit(pipe, args: argparse.Namespace, parser: argparse.ArgumentParser, gate_step) -> None:
    from .. import api

    try:
        api.enable(pipe, **_enable_kwargs(args, gate_step))
    except (ValueError, TypeError) as error:
        parser.exit(2, f"{parser.prog}: error: T-GATE cannot run on --model {args.model}: {error}\n")


def _check_tgate_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Option combinations ``enable`` refuses, refused before the model is loaded."""
    auto = args.gate_step == "auto"
    if args.auto_gate is not None and not (auto and args.tgate):
        parser.error(f"argument --auto-gate: tells how --gate-step auto chooses; it was given with "
                     f"{'--no-tgate' if not args.tgate else f'--gate-step {args.gate_step}'}")
    if not args.tgate:
        return
    if args.compile and args.deepcache is not None:
        parser.error("argument --compile: does not combine with --deepcache; use one of them")
    if auto and (args.compile or args.deepcache is not None):
        parser.error(f"argument --gate-step: auto does not combine with {'--compile' if args.compile else '--deepcache'}; "
                     f"give a fixed step")


def _run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from accelerate import PartialState

    from .jobs.folder import FolderError, OutputFolder
    from .jobs.prompts import PromptFileError, PromptRow, check_arguments, plan_images, read_prompts

    _check_gate_steps(args, parser, [args.gate_step])
    _check_tgate_options(args, parser)
    import torch

    # processes on a machine without CUDA (or told to use the CPU) meet over gloo
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if state.num_processes > 1 and args.device in (None, "cuda"):
        args.device = str(state.device)  # each process on its own GPU
    args.device = args.device or _device("auto")
    single_file = args.out.lower().endswith(".png")
    try:
        rows = read_prompts(args.prompts) if args.prompts else [PromptRow(0, args.prompt)]
    except PromptFileError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    tasks = plan_images(rows, args.images_per_prompt, args.seed, args.negative_prompt)
    if single_file and len(tasks) != 1:
        parser.error(f"argument --out: {args.out!r} is one image, but the job makes {len(tasks)}; give a folder")
    device = args.device
    settings = dict(
        model=args.model, variant=args.variant, dtype=str(_resolve_dtype(args.dtype, device)).replace("torch.", ""),
        **_call_kwargs(args), seed=args.seed, images_per_prompt=args.images_per_prompt,
        tgate=_enable_kwargs(args, args.gate_step) if args.tgate else None,
    )
    folder = OutputFolder(os.path.dirname(os.path.abspath(args.out)) if single_file else args.out)
    if not single_file:
        try:
            folder.check_run(settings)
        except FolderError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    pipe = _load(args, parser, device)
    try:
        check_arguments(rows, _call_parameters(pipe), type(pipe).__name__)
    except PromptFileError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.tgate:
        _enable_or_exit(pipe, args, parser, args.gate_step)
    if single_file:
        from .jobs.runner import generate_batch

        seconds, images = generate_batch(pipe, tasks, _call_kwargs(args))
        _save(images[0], args.out)
        label = f"T-GATE (gate_step={args.gate_step}, {args.steps} steps)" if args.tgate else f"plain ({args.steps} steps)"
        print(f"{label}: {seconds:.2f} s -> {args.out} ({images[0].width}x{images[0].height})")
        return 0
    finished = False
    try:
        code = _run_job_in_folder(args, pipe, tasks, folder, settings, state)
        finished = True
        return code
    finally:
        if state.num_processes > 1:
            # a process group left to the interpreter's exit can abort it ("terminate called
            # without an active exception") after every image was written; after a failure the
            # others may never reach a barrier, so only then is it torn down without one
            if finished:
                state.wait_for_everyone()
            state.destroy_process_group()


def _run_job_in_folder(args, pipe, tasks, folder, settings: dict, state) -> int:
    from tqdm.auto import tqdm

    from .. import api
    from .jobs.runner import run_job

    if state.is_main_process:
        folder.write_run(settings)
    state.wait_for_everyone()
    row_fields = dict(model=args.model, settings=settings, device=args.device)
    with tqdm(total=len(tasks), desc="generate", unit="image", file=sys.stderr, disable=not state.is_main_process,
              dynamic_ncols=True) as bar:
        chosen_gate = (lambda: {"gate_step_chosen": api.view(pipe).last_generation.gate_step}) if args.tgate and args.gate_step == "auto" else None
        summary = run_job(pipe, tasks, folder, batch_size=args.batch_size, call_arguments=_call_kwargs(args),
                          row_fields=row_fields, progress=bar.update, batch_fields=chosen_gate)
    if args.tgate:
        api.disable(pipe)
    if state.is_main_process:
        print(summary.render())
        print(f"-> {args.out}")
    return 0


def _call_parameters(pipe) -> set[str]:
    """The named arguments of the pipeline's call (diffusers pipelines' ``**kwargs`` only catch
    deprecated ones, which are refused too)."""
    import inspect

    parameters = inspect.signature(type(pipe).__call__).parameters
    return {name for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _run_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .evaluation import evaluate, render, write_report

    try:
        report = evaluate(args.dir_a, args.dir_b, clip_model=args.clip_model, device=args.device)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(render(report))
    paths = write_report(report, args.out or os.path.join(args.dir_b, "eval"))
    print("written: " + ", ".join(paths.values()))
    return 0


def _run_quality(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .micro.adherence import MICRO_CALL
    from .micro.quality import DEFAULT_GATES, QualitySettings, measure_auto_overhead, measure_quality
    from .micro.quality_report import render, write_all

    unknown = [name for name in args.models if name not in MICRO_CALL]
    if unknown:
        parser.error(f"argument --models: {', '.join(unknown)} not known; expected a comma-separated subset of {', '.join(MICRO_CALL)}")
    steps = min(MICRO_CALL[name]["num_inference_steps"] for name in args.models)
    gates = tuple(args.gates) if args.gates is not None else DEFAULT_GATES
    if not all(0 < gate < steps for gate in gates):
        parser.error(f"argument --gates: {','.join(map(str, gates))} must each be between 1 and {steps - 1} (the micro pipelines run {steps} steps)")
    settings = QualitySettings(gates=gates, images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
                               seed=args.seed, deepcache=args.deepcache, auto_gate=args.auto_gate)
    rows, overheads = [], []
    for name in args.models:
        rows += measure_quality(name, settings, progress=lambda message: print(message, file=sys.stderr, flush=True))
        overheads.append(measure_auto_overhead(name, settings))
    print(render(rows, overheads, settings))
    print("written: " + ", ".join(write_all(rows, overheads, settings, args.out, plot=args.plot).values()))
    return 0


def _run_train_micro(arguments: list[str]) -> int:
    from .micro.train import main as train_main

    return train_main(arguments)


def _run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .. import api
    from .benchmarking.fidelity import fidelity, labelled_grid

    _check_gate_steps(args, parser, args.gate_steps)
    pipe = _load(args, parser, args.device or _device("auto"))
    _enable_or_exit(pipe, args, parser, args.gate_steps[0])
    api.disable(pipe)
    baseline, baseline_s = _timed_image(pipe, _prompt_kwargs(args))
    tiles = [(baseline, f"baseline, {args.steps} steps", f"{baseline_s:.2f} s")]
    rows = [("baseline", "-", f"{baseline_s:.2f}", "inf", "1.0000")]
    for gate_step in args.gate_steps:
        api.enable(pipe, **_enable_kwargs(args, gate_step))
        try:
            image, seconds = _timed_image(pipe, _prompt_kwargs(args))
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


def _prompt_kwargs(args: argparse.Namespace) -> dict:
    import torch

    kwargs = dict(_call_kwargs(args), prompt=args.prompt, generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    return kwargs


def _timed_image(pipe, kwargs: dict):
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(**kwargs).images[0]
    return image, time.perf_counter() - start


def _save(image, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    image.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["train-micro"]:  # its own parser owns every option, --help included
        return _run_train_micro(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
