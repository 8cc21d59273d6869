"""Does cross-attention converge early in the micro pipelines?  (T-GATE's premise.)  And the
text stream of the joint-attention ones (micro SD3, micro FLUX)?

Forward hooks on every attention module of the denoiser whose ``is_cross_attention`` is True
(micro SD, micro PixArt), or on every text-stream module T-GATE freezes after the gate (micro
SD3 and FLUX: each dual-stream block's text q/k/v and output projections and text feed-forward;
FLUX: each single-stream block's text rows too),
record its output at each denoising step of one guided generation of all ``EVAL_PROMPTS``; the
relative change from one step to the next, ||A_t - A_{t-1}|| / ||A_{t-1}|| (per image, then
averaged over the images), is plotted per layer with the mean over layers, and tabulated in a
Markdown file.

    OMP_NUM_THREADS=2 python bench/micro/convergence.py --out bench/micro
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tgate_kernels.engine.attention_modules import text_stream_modules
from tgate_kernels.tools.micro.adherence import MICRO_CALL, load_micro_pipeline, micro_call
from tgate_kernels.tools.micro.world import EVAL_PROMPTS

PIPELINES = ("sd", "pixart", "sd3", "flux")
JOINT_ATTENTION = frozenset({"sd3", "flux"})
# Steps over which "early" and "late" change are averaged in the summary.
EARLY, LATE = slice(0, 4), slice(-8, None)


def relative_changes(name: str, seed: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Per cross-attention layer (text-stream module), the mean relative change of its output at each step after the
    first, and the timesteps of the generation."""
    pipe = load_micro_pipeline(name)
    denoiser = pipe.unet if name == "sd" else pipe.transformer
    if name in JOINT_ATTENTION:
        watched = [(module.name, module.module) for module in text_stream_modules(denoiser)]
    else:
        watched = [(layer, module) for layer, module in denoiser.named_modules() if getattr(module, "is_cross_attention", False)]
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer, module in watched:
        outputs[layer] = []
        # a single-stream block (FLUX's) returns its text rows' output first, then its image rows'
        hook = lambda _module, _inputs, output, calls=outputs[layer]: calls.append(
            (output[0] if isinstance(output, tuple) else output).detach().clone()
        )
        handles.append(module.register_forward_hook(hook))
    try:
        generator = torch.Generator().manual_seed(seed)
        pipe(list(EVAL_PROMPTS), generator=generator, output_type="np", **micro_call(name, len(EVAL_PROMPTS)))
    finally:
        for handle in handles:
            handle.remove()
    changes = {}
    steps = len(pipe.scheduler.timesteps)
    for layer, calls in outputs.items():
        # One call per step (the guided batch, unconditional and conditional halves at once), or
        # two with true CFG (FLUX: the prompt's, then the negative prompt's): the prompt's.
        stacked = torch.stack(calls[:: len(calls) // steps]).flatten(2)
        difference = (stacked[1:] - stacked[:-1]).norm(dim=2)
        changes[layer] = (difference / stacked[:-1].norm(dim=2)).mean(dim=1).numpy()
    return changes, pipe.scheduler.timesteps.tolist()


def plot(results: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for axis, (name, changes) in zip(axes[0], results.items()):
        steps = np.arange(1, len(next(iter(changes.values()))) + 1)
        for layer, values in changes.items():
            # past ten layers a legend would cover the curves: the layers go unnamed, the table names them
            axis.plot(steps, values, linewidth=0.8, alpha=0.55, label=layer if len(changes) <= 10 else None)
        axis.plot(steps, np.mean(list(changes.values()), axis=0), color="black", linewidth=2.4, label="mean")
        axis.set_yscale("log")
        axis.set_xlabel("denoising step t")
        axis.set_ylabel("||A_t - A_{t-1}|| / ||A_{t-1}||")
        what = "text-stream" if name in JOINT_ATTENTION else "cross-attention"
        axis.set_title(f"micro {name}: {what} output change per step")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=5.5, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def markdown(results: dict[str, dict[str, np.ndarray]], timesteps: dict[str, list[int]], command: str, seconds: float) -> str:
    call = MICRO_CALL["sd"]
    lines = [
        "# Cross-attention and text-stream convergence in the micro pipelines",
        "",
        "T-GATE caches cross-attention after a gate step because, in trained text-to-image models, its output",
        "stops changing early in sampling; in a joint-attention model it freezes the text stream instead.  This",
        "checks that the micro pipelines (trained by `tgate-kernels train-micro`, shipped in",
        "`tgate_kernels/tools/micro/weights/`) show that: the relative change ||A_t - A_{t-1}|| / ||A_{t-1}|| of",
        "every cross-attention output (modules with `is_cross_attention`: micro SD, micro PixArt) and of every",
        "text-stream module T-GATE freezes (each dual-stream block's `add_q_proj`, `add_k_proj`, `add_v_proj`,",
        "`to_add_out` and `ff_context`: micro SD3 and FLUX; and the text rows of each FLUX single-stream block),",
        f"per image and averaged over the 48 `EVAL_PROMPTS`, over one generation of {call['num_inference_steps']} steps",
        f"(DDIM for SD and PixArt, flow-matching Euler for SD3 and FLUX) with guidance {call['guidance_scale']} (FLUX:",
        f"true CFG {MICRO_CALL['flux']['true_cfg_scale']}, its prompt's calls measured; `MICRO_CALL`), seed 0.",
        "",
        "![convergence](cross_attention_convergence.png)",
        "",
        f"Made by (took {seconds:.0f} s on the CPU):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    for name, changes in results.items():
        mean = np.mean(list(changes.values()), axis=0)
        lines += [
            f"## {name}",
            "",
            f"{len(changes)} {'text-stream modules' if name in JOINT_ATTENTION else 'cross-attention layers'}.  "
            "Mean over them at step t (t = 1 is the change from step 0 to 1):",
            "",
            "| step t | timestep | mean change |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {t} | {timesteps[name][t]} | {value:.4f} |" for t, value in enumerate(mean, start=1)]
        early, late = mean[EARLY].mean(), mean[LATE].mean()
        lines += [
            "",
            f"Mean change over steps 1-4: {early:.4f}; over the last 8 steps: {late:.4f} "
            f"({early / late:.1f}x smaller late).  Per layer (steps 1-4 / last 8):",
            "",
            "| layer | steps 1-4 | last 8 |",
            "|---|---:|---:|",
        ]
        lines += [f"| `{layer}` | {values[EARLY].mean():.4f} | {values[LATE].mean():.4f} |" for layer, values in changes.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    command = " ".join(["OMP_NUM_THREADS=2 python bench/micro/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    results, timesteps = {}, {}
    for name in PIPELINES:
        results[name], timesteps[name] = relative_changes(name, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "cross_attention_convergence.png")
    text = markdown(results, timesteps, command, time.perf_counter() - start)
    (args.out / "CONVERGENCE.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
