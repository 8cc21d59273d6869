"""``tgate-kernels generate``: images with T-GATE, one prompt or a prompts file into a folder
(resumable, data-parallel under ``accelerate launch -m tgate_kernels generate ...``)."""

from __future__ import annotations

import argparse
import inspect
import os
import sys

from . import arguments

SUMMARY = ("generate images with T-GATE: one prompt, or a prompts file into a folder (resumable, "
           "data-parallel under `accelerate launch -m tgate_kernels generate ...`)")


def add_parser(commands) -> None:
    sub = commands.add_parser("generate", help=SUMMARY, description=SUMMARY + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prompts = sub.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts", metavar="FILE",
                         help="a text file (one prompt a line) or JSON Lines (.jsonl: prompt, negative_prompt, seed, "
                              "any pipeline argument)")
    arguments.add_pipeline_options(sub)
    sub.add_argument("--gate-step", type=arguments.gate_step, default=10,
                     help="an int step, a float fraction of the steps (0.4), or auto (chosen per batch; the metadata "
                          "records the step chosen)")
    sub.add_argument("--auto-gate", type=arguments.auto_gate, default=None, metavar="KEY=VALUE,...",
                     help="how --gate-step auto chooses, e.g. threshold=0.08,min_fraction=0.2,max_fraction=0.6,patience=2")
    sub.add_argument("--no-tgate", dest="tgate", action="store_false", help="the plain pipeline: the baseline set")
    sub.add_argument("--compile", action="store_true", help="tgate_kernels.enable(pipe, compile=True)")
    sub.add_argument("--batch-size", type=arguments.positive_int, default=1, help="images per pipeline call")
    sub.add_argument("--images-per-prompt", type=arguments.positive_int, default=1)
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
    try:
        rows = read_prompts(args.prompts) if args.prompts else [PromptRow(0, args.prompt)]
    except PromptFileError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    tasks = plan_images(rows, args.images_per_prompt, args.seed, args.negative_prompt)
    if single_file and len(tasks) != 1:
        parser.error(f"argument --out: {args.out!r} is one image, but the job makes {len(tasks)}; give a folder")
    device = args.device
    settings = dict(
        model=args.model, variant=args.variant, dtype=str(arguments.resolve_dtype(args.dtype, device)).replace("torch.", ""),
        **arguments.call_kwargs(args), seed=args.seed, images_per_prompt=args.images_per_prompt,
        tgate=config.to_dict() if args.tgate else None,
    )
    folder = OutputFolder(os.path.dirname(os.path.abspath(args.out)) if single_file else args.out)
    if not single_file:
        try:
            folder.check_run(settings)
        except FolderError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    pipe = arguments.load_or_exit(args, parser, device)
    try:
        check_arguments(rows, _call_parameters(pipe), type(pipe).__name__)
    except PromptFileError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
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
    with tqdm(total=len(tasks), desc="generate", unit="image", file=sys.stderr, disable=not state.is_main_process,
              dynamic_ncols=True) as bar:
        chosen_gate = (lambda: {"gate_step_chosen": api.view(pipe).last_generation.gate_step}) if args.tgate and args.gate_step == "auto" else None
        summary = run_job(pipe, tasks, folder, batch_size=args.batch_size, call_arguments=arguments.call_kwargs(args),
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
    parameters = inspect.signature(type(pipe).__call__).parameters
    return {name for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
