"""The quality table and its Pareto plot (adherence and FID against the MACs ratio)."""

from __future__ import annotations

import dataclasses

import json
import os
from collections.abc import Sequence

from ..benchmarking.report import format_table
from .quality import AutoOverhead, QualityRow, QualitySettings, as_json, dominating

_KIND_STYLE = {
    "fixed": dict(marker="o", linestyle="-", color="tab:blue", label="fixed gate"),
    "prompt-part": dict(marker="v", linestyle="-.", color="tab:brown", label="fixed gate, prompt's part with its own cache"),
    "guidance-kept": dict(marker="x", linestyle=(0, (1, 1)), color="tab:olive", label="fixed gate, text frozen, guidance kept"),
    "deepcache": dict(marker="s", linestyle="--", color="tab:green", label="fixed gate + DeepCache"),
    "cfg-truncation": dict(marker="^", linestyle=":", color="tab:orange", label="CFG truncation (nothing cached)"),
}

_PLOTTED = (
    ("adherence", "prompt adherence", True),
    ("attribute_adherence", "attributes shown", True),
    ("fid", "FID against ungated", False),
)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gate(row: QualityRow) -> str:
    chosen = sorted(row.gates_chosen)
    if row.kind != "auto" or not chosen:
        return _number(row.gate_step, 0)
    return f"{row.gate_step:.1f} ({chosen[0]}-{chosen[-1]})"


def quality_table(rows: Sequence[QualityRow]) -> str:
    headers = ["model", "variant", "gate", "adherence", "attributes", "PSNR (dB)", "SSIM", "FID", "MACs ratio"]
    return format_table(headers, [
        [row.model, row.variant, _gate(row), f"{100 * row.adherence:.1f}%",
         "-" if row.attribute_adherence is None else f"{100 * row.attribute_adherence:.1f}%", _number(row.psnr, 1), f"{row.ssim:.3f}",
         f"{row.fid:.2f}", f"{row.macs_ratio:.3f}"]
        for row in rows
    ])


def pareto_verdicts(rows: Sequence[QualityRow]) -> list[str]:
    lines = []
    for auto in (row for row in rows if row.kind == "auto"):
        beaten = dominating(auto, [row for row in rows if row.model == auto.model])
        if beaten:
            names = ", ".join(f"{row.variant} ({100 * row.adherence:.1f}%, {row.macs_ratio:.3f})" for row in beaten)
            lines.append(f"- {auto.model}: auto is below the fixed-gate front: {names} beat it on both axes.")
        else:
            lines.append(f"- {auto.model}: auto is on or above the fixed-gate front: no fixed gate has both higher "
                         f"adherence and fewer MACs ({100 * auto.adherence:.1f}% at {auto.macs_ratio:.3f}).")
        matching = [row for row in rows if row.model == auto.model and row.kind == "fixed" and row.adherence >= auto.adherence]
        if matching:
            cheapest = min(matching, key=lambda row: row.macs_ratio)
            lines.append(f"  The cheapest fixed gate with at least its adherence: {cheapest.variant} "
                         f"({100 * cheapest.adherence:.1f}% at {cheapest.macs_ratio:.3f}).")
    return lines


def _verdicts(rows: Sequence[QualityRow], kind: str, gated_kinds: tuple[str, ...]) -> list[str]:
    """For each row of ``kind``: does a T-GATE row (of ``gated_kinds``) at no more MACs read the
    prompts at least as well, and stay at least as close to the ungated images (FID)?"""
    lines = []
    for other in (row for row in rows if row.kind == kind):
        cheaper = [row for row in rows if row.model == other.model and row.kind in gated_kinds and row.macs_ratio <= other.macs_ratio]
        beating = [row for row in cheaper if row.adherence >= other.adherence and row.fid <= other.fid]
        head = (f"- {other.model}: {other.variant} ({100 * other.adherence:.1f}%, FID {other.fid:.2f}, "
                f"MACs {other.macs_ratio:.3f}): ")
        if beating:
            best = min(beating, key=lambda row: row.fid)
            lines.append(head + f"T-GATE {best.variant} is as good or better at fewer MACs "
                                f"({100 * best.adherence:.1f}%, FID {best.fid:.2f}, MACs {best.macs_ratio:.3f}).")
        elif cheaper:
            lines.append(head + "no T-GATE gate at its MACs or fewer matches it on both adherence and FID.")
        else:
            lines.append(head + "no T-GATE gate runs at its MACs or fewer.")
    return lines


def truncation_verdicts(rows: Sequence[QualityRow]) -> list[str]:
    """For each CFG-truncation point: is T-GATE (a fixed gate) as good at no more MACs?"""
    return _verdicts(rows, "cfg-truncation", ("fixed", "prompt-part"))


def cache_verdicts(rows: Sequence[QualityRow]) -> list[str]:
    """For each diffusers cache: is T-GATE (a fixed gate, with DeepCache or not) as good at no more MACs?"""
    return _verdicts(rows, "diffusers-cache", ("fixed", "prompt-part", "deepcache"))


def freezing_lines(rows: Sequence[QualityRow]) -> list[str]:
    """At each gate: what freezing the text costs alone (guidance kept), what dropping the guidance
    alone costs (CFG truncation) and what both cost (T-GATE), in adherence."""
    lines = []
    for kept in (row for row in rows if row.kind == "guidance-kept"):
        same = {row.kind: row for row in rows if row.model == kept.model and row.gate_step == kept.gate_step}
        parts = [f"text frozen, guidance kept {100 * kept.adherence:.1f}% (MACs {kept.macs_ratio:.3f})"]
        parts += [f"{label} {100 * same[kind].adherence:.1f}% (MACs {same[kind].macs_ratio:.3f})"
                  for kind, label in (("cfg-truncation", "guidance dropped, nothing frozen"), ("fixed", "both (T-GATE)"))
                  if kind in same]
        lines.append(f"- {kept.model}, gate {kept.gate_step:.0f}: " + "; ".join(parts) + ".")
    return lines


def overhead_lines(overheads: Sequence[AutoOverhead]) -> list[str]:
    return [
        f"- {o.model}: {1000 * o.chooser_seconds:.1f} ms of {o.generation_seconds:.2f} s choosing the gate "
        f"({100 * o.fraction:.2f}% of the generations' time, and so of an average step)"
        for o in overheads
    ]


def render(rows: Sequence[QualityRow], overheads: Sequence[AutoOverhead], settings: QualitySettings) -> str:
    auto = dataclasses.asdict(settings.auto_gate) if settings.auto_gate is not None else {}
    lines = [
        f"{len(settings.prompts)} prompts x {settings.images_per_prompt} seeds, batches of {settings.batch_size} "
        f"(auto decides once per batch), seed {settings.seed}; auto_gate {json.dumps(auto) if auto else 'defaults'}; "
        f"T-GATE with sp_interval={settings.sp_interval}, warm_up={settings.warm_up}.",
        "",
        quality_table(rows),
        "",
        *pareto_verdicts(rows),
        *truncation_verdicts(rows),
        *cache_verdicts(rows),
        *freezing_lines(rows),
        *overhead_lines(overheads),
    ]
    return "\n".join(lines) + "\n"


def write_plot(rows: Sequence[QualityRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row.model for row in rows))
    figure, axes = plt.subplots(len(_PLOTTED), len(models), figsize=(5.5 * len(models), 4 * len(_PLOTTED)), squeeze=False)
    for column, model in enumerate(models):
        mine = [row for row in rows if row.model == model]
        ungated = next(row for row in mine if row.kind == "ungated")
        floor = next((row for row in mine if row.kind == "floor"), None)
        for line, (metric, label, percent) in enumerate(_PLOTTED):
            axis = axes[line][column]
            scale = 100 if percent else 1
            for kind, style in _KIND_STYLE.items():
                series = sorted((row for row in mine if row.kind == kind), key=lambda row: row.macs_ratio)
                if series:
                    axis.plot([row.macs_ratio for row in series], [scale * getattr(row, metric) for row in series], **style)
                    for row in series:
                        axis.annotate(f"{row.gate_step:.0f}", (row.macs_ratio, scale * getattr(row, metric)),
                                      textcoords="offset points", xytext=(4, 4), fontsize=7, color=style["color"])
            caches = [row for row in mine if row.kind == "diffusers-cache"]
            if caches:
                axis.plot([row.macs_ratio for row in caches], [scale * getattr(row, metric) for row in caches], marker="P",
                          color="tab:purple", linestyle="", label="diffusers' caches")
                for row in caches:
                    short = row.variant.replace("FirstBlockCache", "FBC").split(",")[0]
                    axis.annotate(short, (row.macs_ratio, scale * getattr(row, metric)), textcoords="offset points",
                                  xytext=(4, -9), fontsize=6, color="tab:purple")
            for row in (row for row in mine if row.kind == "auto"):
                axis.plot(row.macs_ratio, scale * getattr(row, metric), marker="D", color="tab:red", linestyle="",
                          markersize=9, label=f"auto (mean gate {row.gate_step:.1f})")
            axis.plot(1.0, scale * getattr(ungated, metric), marker="*", color="black", linestyle="", markersize=12,
                      label="ungated")
            if floor is not None:
                axis.axhline(scale * getattr(floor, metric), color="grey", linestyle=":", linewidth=1,
                             label="ungated, other seeds")
            axis.set_xlabel("MACs ratio (gated / ungated)")
            axis.set_ylabel(label + (" (%)" if percent else ""))
            axis.set_title(f"micro {model}: {label}")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(rows: Sequence[QualityRow], overheads: Sequence[AutoOverhead], settings: QualitySettings,
              directory: str, plot: bool = True) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    written = {"json": os.path.join(directory, "quality.json"), "markdown": os.path.join(directory, "quality.md")}
    with open(written["json"], "w") as handle:
        json.dump(as_json(rows, overheads, settings), handle, indent=2)
        handle.write("\n")
    with open(written["markdown"], "w") as handle:
        handle.write(render(rows, overheads, settings))
    if plot:
        written["plot"] = os.path.join(directory, "quality.png")
        write_plot(rows, written["plot"])
    return written
