"""``tgate-kernels generate``: images with T-GATE, one prompt or a prompts file into a folder
(resumable, data-parallel under ``accelerate launch -m tgate_kernels generate ...``)."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import sys

from ...config import TgateConfig
from . import arguments

SUMMARY = ("generate images with T-GATE: one prompt, or a prompts file into a folder (resumable, "
           "data-parallel under `accelerate launch -m tgate_kernels generate ...`)")


def add_parser(commands) -> None:
    sub = commands.add_parser("generate", help=SUMMARY, description=SUMMARY + ".", formatter_class=arguments.HelpFormatter)
    prompts = sub.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts", metavar="FILE",
                         help="a text file (one prompt a line) or JSON Lines (.jsonl: prompt, negative_prompt, seed, "
                              "any pipeline argument)")
    arguments.add_pipeline_options(sub)
    sub.add_argument("--gate-step", type=arguments.gate_step, default=0.4,
                     help="an int step, a float fraction of the steps (the default 0.4 is the published 10 of 25), or "
                          "auto (chosen per batch; the metadata records the step chosen)")
    sub.add_argument("--auto-gate", type=arguments.auto_gate, default=None, metavar="KEY=VALUE,...",
                     help="how --gate-step auto chooses, e.g. threshold=0.08,min_fraction=0.2,max_fraction=0.6,patience=2")
    sub.add_argument("--no-tgate", dest="tgate", action="store_false", help="the plain pipeline: the baseline set")
    sub.add_argument("--compile", action="store_true", help="tgate_kernels.enable(pipe, compile=True)")
    sub.add_argument("--batch-size", type=arguments.positive_int, default=1, help="images per pipeline call")
    sub.add_argument("--images-per-prompt", type=arguments.positive_int, default=1)
    sub.add_argument("--start", type=arguments.non_negative_int, default=0,
                     help="the first prompt of the file to make (0-based; seeds still follow each prompt's place)")
    sub.add_argument("--limit", type=arguments.positive_int, default=None, help="make at most this many prompts")
    sub.add_argument("--image-format", choices=("png", "jpg", "webp"), default="png",
                     help="png (lossless, with the prompt and seed as text), jpg or webp")
    sub.add_argument("--image-quality", type=arguments.positive_int, default=95, help="jpg/webp quality (1-100)")
    sub.add_argument("--quiet", action="store_true", help="print errors only: no progress bars, no summary")
    sub.add_argument("--out", default="images", help="a folder (images, metadata.jsonl, run.json), or a .png file for one image")
    sub.set_defaults(handler=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from accelerate import PartialState

    from ..jobs.folder import FolderError, OutputFolder
    from ..jobs.prompts import PromptFileError, PromptRow, check_arguments, plan_images, read_prompts

    if args.tgate:
        config = arguments.tgate_config(args, parser, args.gate_step)
    elif args.auto_gate is not None:
        parser.error("argument --auto-gate: tells how --gate-step auto chooses; it was given with --no-tgate")
    import torch

    # processes on a machine without CUDA (or told to use the CPU) meet over gloo
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if state.num_processes > 1 and args.device in (None, "cuda"):
        args.device = str(state.device)  # each process on its own GPU
    args.device = args.device or arguments.device("auto")
    single_file = args.out.lower().endswith(".png")
    if args.image_quality > 100:
        parser.error(f"argument --image-quality: {args.image_quality} is not allowed; expected 1 to 100")
    try:
        all_rows = read_prompts(args.prompts) if args.prompts else [PromptRow(0, args.prompt)]
    except PromptFileError as error:
        parser.error(str(error))
    rows = all_rows[args.start:None if args.limit is None else args.start + args.limit]
    if not rows:
        parser.error(f"argument --start: {args.start} is past the last of the {len(all_rows)} prompts")
    tasks = plan_images(rows, args.images_per_prompt, args.seed, args.negative_prompt, args.image_format)
    if single_file and len(tasks) != 1:
        parser.error(f"argument --out: {args.out!r} is one image, but the job makes {len(tasks)}; give a folder")
    device = args.device
    settings = _job_identity(args, all_rows, config if args.tgate else None, device)
    folder = OutputFolder(os.path.dirname(os.path.abspath(args.out)) if single_file else args.out, args.image_quality)
    if not single_file:
        try:
            folder.check_run(settings, _as_of_now)
        except FolderError as error:
            parser.error(str(error))
    pipe = arguments.load_or_exit(args, parser, device)
    try:
        check_arguments(rows, _call_parameters(pipe), type(pipe).__name__)
    except PromptFileError as error:
        parser.error(str(error))
    if args.tgate:
        arguments.enable_or_exit(pipe, args, parser, config)
    if single_file:
        from ..jobs.runner import generate_batch

        seconds, images = generate_batch(pipe, tasks, arguments.call_kwargs(args))
        arguments.save_image(images[0], args.out)
        label = f"T-GATE (gate_step={args.gate_step}, {args.steps} steps)" if args.tgate else f"plain ({args.steps} steps)"
        print(f"{label}: {seconds:.2f} s -> {args.out} ({images[0].width}x{images[0].height})")
        return 0
    finished = False
    try:
        code = _run_job_in_folder(args, pipe, tasks, folder, settings, state)
        finished = True
        return code
    except KeyboardInterrupt:
        if state.is_main_process:
            print(f"interrupted: {len(folder.done() & {(t.index, t.image, t.seed) for t in tasks})} of {len(tasks)} "
                  f"images are in {args.out}; run the same command again to make the rest", file=sys.stderr)
        return 130
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

    from ... import api
    from ..jobs.runner import run_job

    if state.is_main_process:
        folder.write_run(settings)
    state.wait_for_everyone()
    row_fields = dict(model=args.model, settings=settings, device=args.device)
    with tqdm(total=len(tasks), desc="generate", unit="image", file=sys.stderr,
              disable=args.quiet or not state.is_main_process, dynamic_ncols=True) as bar:
        chosen_gate = (lambda: {"gate_step_chosen": api.view(pipe).last_generation.gate_step}) if args.tgate and args.gate_step == "auto" else None

        def progress(count: int, already: bool = False) -> None:
            if already:  # counted, but not in the rate: only images made in this run are
                bar.initial = bar.n = count
                bar.refresh()
            else:
                bar.update(count)

        summary = run_job(pipe, tasks, folder, batch_size=args.batch_size, call_arguments=arguments.call_kwargs(args),
                          row_fields=row_fields, progress=progress, batch_fields=chosen_gate)
    if args.tgate:
        api.disable(pipe)
    if state.is_main_process and not args.quiet:
        print(summary.render())
        print(f"-> {args.out}")
    elif state.is_main_process and summary.missing:
        print(f"{summary.missing} images of the job are missing: run the same command again to make them", file=sys.stderr)
    return 1 if summary.missing else 0


def _as_of_now(previous: dict) -> dict:
    """A job's ``run.json`` with the T-GATE settings added since it was written at their defaults
    (which do what the version that wrote it did)."""
    stored = previous.get("tgate")
    if not isinstance(stored, dict):
        return previous
    return {**previous, "tgate": {**TgateConfig().to_dict(), **stored}}


def _job_identity(args: argparse.Namespace, rows, config, device: str) -> dict:
    """What decides the job's images, as ``run.json`` holds it: equal for equal jobs however they
    were spelled (a model folder with or without a trailing slash, a gate as a fraction or as the
    step it resolves to)."""
    if args.prompts:
        with open(args.prompts, "rb") as handle:
            prompts = {"file_sha256": hashlib.sha256(handle.read()).hexdigest()}
    else:
        prompts = {"prompt": args.prompt}
    tgate = None
    if config is not None:
        tgate = config.to_dict()
        if not any("num_inference_steps" in row.arguments for row in rows) and not config.auto:
            tgate["gate_step"] = config.resolve_gate_step(args.steps, beyond_allowed=True)
    model = os.path.realpath(args.model) if os.path.isdir(args.model) else args.model.rstrip("/")
    return dict(
        model=model, variant=args.variant, dtype=str(arguments.resolve_dtype(args.dtype, device)).replace("torch.", ""),
        revision=args.revision, scheduler=args.scheduler, lora=[list(item) for item in args.lora], vae_tiling=args.vae_tiling,
        **arguments.call_kwargs(args), seed=args.seed, images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size, prompts=prompts, negative_prompt=args.negative_prompt, tgate=tgate,
        image_format=args.image_format, image_quality=args.image_quality if args.image_format != "png" else None,
    )


def _call_parameters(pipe) -> set[str]:
    """The named arguments of the pipeline's call (diffusers pipelines' ``**kwargs`` only catch
    deprecated ones, which are refused too)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    return {name for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
