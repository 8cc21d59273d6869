"""Presenting a bench run: terminal tables, and JSON, CSV and PNG files."""

from __future__ import annotations

import os
from typing import Iterable

from .results import BenchResults


def _count(value, units=((1e12, "T"), (1e9, "G"), (1e6, "M"))) -> str:
    """A large count with an SI-style unit: MACs in T/G/M, params in B/M."""
    if value is None:
        return "-"
    for scale, unit in units:
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return f"{value:.0f}"


def _params(value) -> str:
    return _count(value, ((1e9, "B"), (1e6, "M")))


def _fixed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, rule, *body])


def macs_table(results: BenchResults) -> str:
    headers = ["model", "variant", "steps", "gate", "MACs", "ratio", "published MACs", "published ratio", "MACs+scores",
               "ratio+scores", "params", "published params"]
    rows = [
        [
            r.label,
            r.variant,
            r.steps,
            "-" if r.gate_step is None else r.gate_step,
            _count(r.macs),
            _fixed(r.macs_ratio),
            _count(r.published_macs),
            _fixed(r.published_macs_ratio),
            _count(r.macs_with_attention_scores),
            _fixed(r.macs_ratio_with_attention_scores),
            _params(r.params),
            _params(r.published_params),
        ]
        for r in results.macs
    ]
    return format_table(headers, rows)


def latency_table(results: BenchResults) -> str:
    headers = ["model", "variant", "px", "steps", "gate", "device", "median s", "vs baseline", "MACs predict",
               "vs reference", "peak MB", "first call s", "first call MB", "note"]
    rows = [
        [
            r.label,
            r.variant,
            r.resolution,
            r.steps,
            "-" if r.gate_step is None else r.gate_step,
            f"{r.device}/{r.dtype}",
            _fixed(r.median_s),
            _fixed(r.latency_ratio),
            _fixed(r.macs_ratio),
            _fixed(r.latency_ratio_vs_reference),
            _fixed(r.peak_memory_mb, 1),
            _fixed(r.first_call_s, 1),
            _fixed(r.first_call_peak_memory_mb, 1),
            (r.error or "")[:60],
        ]
        for r in results.latency
    ]
    return format_table(headers, rows)


def resolutions_table(results: BenchResults) -> str:
    headers = ["model", "px", "steps", "gate", "device", "baseline s", "T-GATE s", "ratio", "MACs predict", "MACs w/o scores"]
    rows = [
        [r.model, r.resolution, r.steps, r.gate_step, f"{r.device}/{r.dtype}", _fixed(r.baseline_s), _fixed(r.tgate_s),
         _fixed(r.latency_ratio), _fixed(r.macs_ratio), _fixed(r.macs_ratio_without_attention_scores)]
        for r in results.resolutions
    ]
    return format_table(headers, rows)


def python_calls_table(results: BenchResults) -> str:
    headers = ["model", "variant", "steps", "Python calls/step", "added/step"]
    rows = [[r.model, r.variant, r.steps, _fixed(r.calls_per_step, 1), _fixed(r.added_calls_per_step, 1)] for r in results.python_calls]
    return format_table(headers, rows)


def throughput_table(results: BenchResults) -> str:
    headers = ["model", "prompts", "px", "steps", "gate", "device", "baseline img/s", "T-GATE img/s", "time ratio", "MACs predict"]
    rows = [
        [r.model, r.prompts, r.resolution, r.steps, r.gate_step, f"{r.device}/{r.dtype}", _fixed(r.baseline_images_per_s),
         _fixed(r.tgate_images_per_s), _fixed(r.latency_ratio), _fixed(r.macs_ratio)]
        for r in results.throughput
    ]
    return format_table(headers, rows)


def render(results: BenchResults) -> str:
    parts = ["MACs of a whole generation (denoiser), published settings", macs_table(results), "", results.macs_convention]
    if results.latency:
        parts += ["", "Latency (" + results.latency_scope + ")", latency_table(results)]
        parts.append(f"peak memory: {results.latency[0].memory_measure}")
    if results.resolutions:
        parts += ["", "T-GATE vs baseline across image sizes (fused T-GATE; MACs predict the ratio with attention scores)", resolutions_table(results)]
    if results.python_calls:
        parts += ["", "Python function calls per denoising step", python_calls_table(results)]
    if results.throughput:
        parts += ["", "Throughput of the denoiser alone (its generation of a batch of prompts; text encoding, scheduler "
                  "and VAE left out), baseline vs eager T-GATE, medians of interleaved rounds", throughput_table(results)]
    if results.notes:
        parts += ["", *results.notes]
    return "\n".join(parts)


def write_plot(results: BenchResults, path: str) -> None:
    """Three panels a person can read: each timed variant's seconds with its ratio to the baseline
    and what MACs predict; the latency ratio across image sizes next to the MACs prediction; and
    the MACs ratio at every gate step of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (variants_axis, sizes_axis, gates_axis) = plt.subplots(1, 3, figsize=(16, 4.8))
    _plot_variants(variants_axis, results)
    _plot_sizes(sizes_axis, results)
    _plot_gates(gates_axis, results)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _say_empty(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()


def _plot_variants(axis, results: BenchResults) -> None:
    rows = [r for r in results.latency if r.median_s is not None]
    if not rows:
        _say_empty(axis, "no latency run")
        return
    labels = [f"{r.variant}" + (f" (gate {r.gate_step})" if r.gate_step is not None else "") for r in rows]
    positions = range(len(rows))
    bars = axis.barh(list(positions), [r.median_s for r in rows], color=["#888888" if r.variant == "baseline" else "#3b75af" for r in rows])
    for bar, row in zip(bars, rows):
        note = f" {row.median_s:.2f} s"
        if row.latency_ratio is not None and row.variant != "baseline":
            note += f"  ×{row.latency_ratio:.2f} (MACs ×{row.macs_ratio:.2f})"
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    axis.set_yticks(list(positions), labels, fontsize=8)
    axis.invert_yaxis()
    first = rows[0]
    axis.set_title(f"{first.label}, {first.resolution} px, {first.steps} steps, {first.device}/{first.dtype}", fontsize=9)
    axis.set_xlabel("median seconds per generation (ratio to baseline; MACs prediction)")
    axis.set_xlim(0, max(r.median_s for r in rows) * 1.6)


def _plot_sizes(axis, results: BenchResults) -> None:
    rows = [r for r in results.resolutions if r.latency_ratio is not None]
    if not rows:
        _say_empty(axis, "no resolution sweep")
        return
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        sizes = [r.resolution for r in mine]
        axis.plot(sizes, [r.latency_ratio for r in mine], marker="o", label=f"{model}: measured")
        axis.plot(sizes, [r.macs_ratio for r in mine], linestyle="--", marker="x", label=f"{model}: MACs predict")
        for r in mine:
            axis.annotate(f"{r.latency_ratio:.2f}", (r.resolution, r.latency_ratio), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axis.set_xticks(sorted({r.resolution for r in rows}))
    axis.set_xlabel("image side (px)")
    axis.set_ylabel("T-GATE time / baseline time")
    axis.set_ylim(0, 1.05)
    axis.set_title(f"T-GATE vs baseline across sizes ({rows[0].steps} steps, gate {rows[0].gate_step})", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _plot_gates(axis, results: BenchResults) -> None:
    by_model: dict[str, list] = {}
    for row in results.macs_sweep:
        by_model.setdefault(row.model, []).append(row)
    for model, rows in by_model.items():
        axis.plot([r.gate_step for r in rows], [r.macs_ratio for r in rows], marker=".", label=f"{model} ({rows[0].steps} steps)")
    axis.set_title("MACs ratio T-GATE / baseline at each gate step", fontsize=9)
    axis.set_xlabel("gate_step")
    axis.set_ylabel("MACs ratio (attention scores excluded)")
    axis.grid(alpha=0.3)
    if by_model:
        axis.legend(fontsize=7)


def write_all(results: BenchResults, directory: str, plot: bool = True) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    paths = {
        "json": os.path.join(directory, "bench.json"),
        "csv": os.path.join(directory, "bench.csv"),
        "table": os.path.join(directory, "bench.txt"),
    }
    results.write_json(paths["json"])
    results.write_csv(paths["csv"])
    with open(paths["table"], "w", encoding="utf-8") as handle:
        handle.write(render(results) + "\n")
    if plot:
        paths["png"] = os.path.join(directory, "bench.png")
        write_plot(results, paths["png"])
    return paths
