"""What the commands share: argument types whose errors name the value and what is allowed
(argparse adds the option), the options of a pipeline call, and T-GATE's config from the flags.

A ``TgateConfig`` validates T-GATE's options once; its errors, which name the Python arguments,
are shown here with the flags that set them.
"""

from __future__ import annotations

import argparse
import os
import re

from ...config import AutoGate, DeepCacheOptions, GuidanceAfterGate, TgateConfig, check_int

DTYPES = ("auto", "float32", "float16", "bfloat16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for switches, options without a
    default, or help that already says what happens when the option is not given."""

    def _get_help_string(self, action):
        text = action.help or ""
        silent = action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0
        return text if silent or "default" in text or "when not given" in text else super()._get_help_string(action)


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected an integer >= {minimum}") from None
        try:
            return check_int("value", value, minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= {minimum}") from None

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def resolution(text: str) -> int:
    value = positive_int(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a multiple of 64 pixels (e.g. 64, 128, 256, 512)")
    return value


def gate_step(text: str) -> int | float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected an int step >= 0, a fraction in (0, 1) or auto") from None
    if value.is_integer() and "." not in text:
        return non_negative_int(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; expected an int step >= 0, a fraction in (0, 1) or auto")
    return value


def gate_step_or_none(text: str) -> int | float | None:
    """A fixed gate (a step or a fraction of the steps), or ``none`` for no T-GATE."""
    if text.strip().lower() == "none":
        return None
    value = gate_step(text)
    if value == "auto":
        raise argparse.ArgumentTypeError("auto is not allowed here; expected an int step >= 0, a fraction in (0, 1) or none")
    return value


def positive_float_list(text: str) -> list[float]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number; expected comma-separated numbers > 0, e.g. 0.1,0.2") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{item} is not allowed; expected comma-separated numbers > 0, e.g. 0.1,0.2")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected comma-separated numbers > 0, e.g. 0.1,0.2")
    return values


def resolution_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    return [resolution(item.strip()) for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected comma-separated integers >= 0, e.g. 5,10,15")
    return [non_negative_int(item) for item in items]


def name_list(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} is empty; expected comma-separated model names")
    return names


def deepcache(text: str) -> DeepCacheOptions:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not INTERVAL,BRANCH; expected e.g. 3,0")
    return DeepCacheOptions(cache_interval=positive_int(parts[0]), cache_branch_id=non_negative_int(parts[1]))


def auto_gate(text: str) -> AutoGate:
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
        return AutoGate.from_option(option)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def lora(text: str) -> tuple[str, float]:
    path, colon, scale = text.rpartition(":")
    if not colon or not path or os.sep in scale:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {scale!r} is not a scale; expected PATH or PATH:SCALE, e.g. lora.safetensors:0.8") from None


def device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine (no CUDA device); use cpu or auto")
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; expected auto, cpu, cuda or cuda:N")
    return str(parsed)


def resolve_dtype(name: str, device: str, fast_cpu_dtype: bool = False):
    """``auto``: float16 on CUDA; on a CPU float32, or with ``fast_cpu_dtype`` (benchmarks: what a
    user after speed would run) the faster of bfloat16 and float32 as measured on this CPU
    (:mod:`tgate_kernels.tools.benchmarking.dtype_choice`)."""
    return resolve_dtype_with_reason(name, device, fast_cpu_dtype)[0]


def resolve_dtype_with_reason(name: str, device: str, fast_cpu_dtype: bool = False):
    """(dtype, why it was chosen)."""
    import torch

    if name != "auto":
        return getattr(torch, name), f"{name}: asked for"
    if device.startswith("cuda"):
        return torch.float16, "float16: on CUDA"
    if not fast_cpu_dtype:
        return torch.float32, "float32: on the CPU"
    from ..benchmarking.dtype_choice import fastest_cpu_dtype

    choice = fastest_cpu_dtype()
    return choice.dtype, choice.reason


# ------------------------------------------------------------------------------------------
# Options of the commands that load a pipeline and run it
# ------------------------------------------------------------------------------------------

_FLAGS = {"gate_step": "--gate-step", "sp_interval": "--sp-interval", "fi_interval": "--fi-interval",
          "warm_up": "--warm-up", "deepcache": "--deepcache", "compile": "--compile", "auto_gate": "--auto-gate",
          "gate_cache": "--gate-cache", "guidance_after_gate": "--guidance-after-gate"}


def add_pipeline_options(sub: argparse.ArgumentParser) -> None:
    """The model, the prompt's call and T-GATE's schedule: what ``generate`` and ``compare`` share."""
    sub.add_argument("--model", required=True,
                     help="a pipeline folder (save_pretrained layout) or a Hugging Face Hub id, downloaded when online as "
                          "from_pretrained does")
    sub.add_argument("--local-files-only", action="store_true", help="never download (HF_HUB_OFFLINE=1 does the same)")
    sub.add_argument("--variant", default=None, help="the weights variant to load, e.g. fp16")
    sub.add_argument("--revision", default=None, help="the Hub revision (branch, tag or commit) to load")
    sub.add_argument("--cache-dir", default=None, help="the Hugging Face cache folder to load from (and download into)")
    sub.add_argument("--lora", action="append", default=[], type=lora, metavar="PATH[:SCALE]",
                     help="LoRA weights to load (a file or folder, or a Hub id), with their scale (default 1); repeatable")
    sub.add_argument("--cpu-offload", action="store_true",
                     help="enable_model_cpu_offload(): each model on the GPU only while it runs (needs CUDA)")
    sub.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images on little memory)")
    sub.add_argument("--negative-prompt", default=None, help="for prompts that give none")
    sub.add_argument("--steps", type=positive_int, default=25, help="num_inference_steps")
    sub.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's default when not given")
    sub.add_argument("--guidance-rescale", type=float, default=None,
                     help="the pipeline's guidance_rescale (SD, SDXL), the pipeline's default when not given")
    sub.add_argument("--eta", type=float, default=None, help="DDIM's eta, for pipelines that take it")
    sub.add_argument("--scheduler", default=None, metavar="CLASS",
                     help="a diffusers scheduler class (e.g. DPMSolverMultistepScheduler), built from the model's "
                          "scheduler config; the model's own when not given")
    sub.add_argument("--height", type=positive_int, default=None)
    sub.add_argument("--width", type=positive_int, default=None)
    sub.add_argument("--seed", type=non_negative_int, default=0, help="base seed (see README: every image's seed follows from its place)")
    sub.add_argument("--sp-interval", type=positive_int, default=5,
                     help="before the gate, self-attention is computed every this many steps and reused in between")
    sub.add_argument("--fi-interval", type=positive_int, default=1,
                     help="after the gate, the same interval (1: computed every step)")
    sub.add_argument("--warm-up", type=non_negative_int, default=2,
                     help="steps at the start that compute self-attention before it is first cached")
    sub.add_argument("--gate-cache", choices=("mean", "kept-part"), default="mean",
                     help="what the gate step caches of the prompt's and negative prompt's outputs: their mean (the "
                          "reference) or the part that runs after the gate alone")
    sub.add_argument("--guidance-after-gate", choices=[choice.value for choice in GuidanceAfterGate],
                     default=GuidanceAfterGate.DROPPED.value,
                     help="after the gate, run one guidance part (the reference) or every part, each reusing its own "
                          "cache (the text frozen, the guidance kept)")
    sub.add_argument("--deepcache", type=deepcache, default=None, metavar="INTERVAL,BRANCH", help="also run DeepCache, e.g. 3,0")
    sub.add_argument("--device", type=device, default=None,
                     help="auto, cpu, cuda or cuda:N (default: the process's device under accelerate, else cuda when present)")
    sub.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, float32 on CPU")


def call_kwargs(args: argparse.Namespace) -> dict:
    """The pipeline call's own arguments the flags set."""
    kwargs = dict(num_inference_steps=args.steps)
    optional = dict(guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale, eta=args.eta,
                    height=args.height, width=args.width)
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def tgate_config(args: argparse.Namespace, parser: argparse.ArgumentParser, gate: int | float | str) -> TgateConfig:
    """T-GATE's config from the flags, at ``gate``; a bad combination exits naming the flags."""
    if isinstance(gate, int) and gate > args.steps:
        option = "--gate-step" if args.command == "generate" else "--gate-steps"
        parser.error(f"argument {option}: {gate} is larger than --steps {args.steps}; a gate step must be between 0 and the steps")
    try:
        return TgateConfig(gate_step=gate, sp_interval=args.sp_interval, fi_interval=args.fi_interval, warm_up=args.warm_up,
                           deepcache=args.deepcache, compile=getattr(args, "compile", False),
                           auto_gate=getattr(args, "auto_gate", None), gate_cache=args.gate_cache,
                           guidance_after_gate=args.guidance_after_gate)
    except (TypeError, ValueError) as error:
        parser.error(as_flags(str(error)))


def as_flags(message: str) -> str:
    """A config error as the command line says it: ``argument --flag: ...`` with every option
    named by its flag (``gate_step='auto'`` as ``--gate-step auto``)."""
    message = re.sub(r"`gate_step=(?:'auto'|(\S+?))`", lambda m: f"--gate-step {m.group(1) or 'auto'}", message)
    message = re.sub(r"`(\w+)(?:\['(\w+)'\])?`", lambda m: _FLAGS.get(m.group(1), m.group(1)) + (f" {m.group(2)}" if m.group(2) else ""), message)
    first = re.search(r"--[\w-]+", message)
    return f"argument {first.group(0)}: {message}" if first else message


def load_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser, device: str):
    """The pipeline ``--model`` names, with ``--scheduler`` and the call options it must take."""
    import inspect

    from ..jobs.loading import ModelUnavailable, load_pipeline

    if args.cpu_offload and not device.startswith("cuda"):
        parser.error(f"argument --cpu-offload: offloading moves each model to the GPU while it runs; --device is {device}")
    try:
        pipe = load_pipeline(args.model, device="cpu" if args.cpu_offload else device, dtype=resolve_dtype(args.dtype, device),
                             variant=args.variant, local_files_only=args.local_files_only, revision=args.revision,
                             cache_dir=args.cache_dir)
    except ModelUnavailable as error:
        parser.error(str(error))
    if args.lora:
        names = [f"lora_{index}" for index in range(len(args.lora))]
        try:
            for name, (path, _) in zip(names, args.lora):
                pipe.load_lora_weights(path, adapter_name=name)
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in args.lora])
        except (OSError, ValueError, ImportError) as error:
            parser.error(f"argument --lora: {' '.join(str(error).split())[:300]}")
    if args.vae_tiling:
        pipe.vae.enable_tiling()
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    if args.scheduler is not None:
        import diffusers

        compatible = sorted(c.__name__ for c in getattr(pipe.scheduler, "compatibles", ()))
        scheduler = getattr(diffusers, args.scheduler, None)
        if not isinstance(scheduler, type) or args.scheduler not in compatible:
            parser.error(f"argument --scheduler: {args.scheduler!r} is not a scheduler {type(pipe).__name__} can use; "
                         f"choose one of {', '.join(compatible)}")
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    accepted = inspect.signature(type(pipe).__call__).parameters
    for flag, name in (("--guidance-rescale", "guidance_rescale"), ("--eta", "eta")):
        if getattr(args, name) is not None and name not in accepted:
            parser.error(f"argument {flag}: {type(pipe).__name__} does not take {name}")
    if getattr(args, "quiet", False):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def enable_or_exit(pipe, args: argparse.Namespace, parser: argparse.ArgumentParser, config: TgateConfig) -> None:
    from ... import api

    try:
        api.enable(pipe, config=config)
    except (ValueError, TypeError, ImportError) as error:
        parser.error(f"T-GATE cannot run on --model {args.model}: {error}")


def save_image(image, path: str) -> None:
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
