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
               "vs reference", "peak MB", "note"]
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
            (r.error or "")[:60],
        ]
        for r in results.latency
    ]
    return format_table(headers, rows)


def python_calls_table(results: BenchResults) -> str:
    headers = ["model", "variant", "steps", "Python calls/step", "added/step"]
    rows = [[r.model, r.variant, r.steps, _fixed(r.calls_per_step, 1), _fixed(r.added_calls_per_step, 1)] for r in results.python_calls]
    return format_table(headers, rows)


def render(results: BenchResults) -> str:
    parts = ["MACs of a whole generation (denoiser), published settings", macs_table(results), "", results.macs_convention]
    if results.latency:
        parts += ["", "Latency (" + results.latency_scope + ")", latency_table(results)]
        parts.append(f"peak memory: {results.latency[0].memory_measure}")
    if results.python_calls:
        parts += ["", "Python function calls per denoising step", python_calls_table(results)]
    if results.notes:
        parts += ["", *results.notes]
    return "\n".join(parts)


def write_plot(results: BenchResults, path: str) -> None:
    """MACs ratio (from the schedule, every gate step) and measured latency ratio vs gate step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (macs_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_model: dict[str, list[dict]] = {}
    for row in results.macs_sweep:
        by_model.setdefault(row.model, []).append(row)
    for model, rows in by_model.items():
        macs_axis.plot([r.gate_step for r in rows], [r.macs_ratio for r in rows], marker=".", label=f"{model} ({rows[0].steps} steps)")
    macs_axis.set_title("MACs ratio T-GATE / baseline (attention scores excluded)")
    macs_axis.set_xlabel("gate_step")
    macs_axis.set_ylabel("ratio")
    macs_axis.grid(alpha=0.3)
    if by_model:
        macs_axis.legend(fontsize=7)

    latency_by: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in results.latency:
        if row.gate_step is not None and row.latency_ratio is not None:
            latency_by.setdefault((row.model, row.variant), []).append((row.gate_step, row.latency_ratio))
    for (model, variant), points in latency_by.items():
        points.sort()
        latency_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{model} {variant}")
    latency_axis.set_title("latency ratio vs baseline (measured)")
    latency_axis.set_xlabel("gate_step")
    latency_axis.grid(alpha=0.3)
    if latency_by:
        latency_axis.legend(fontsize=7)
    else:
        latency_axis.text(0.5, 0.5, "no latency run", ha="center", va="center", transform=latency_axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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
