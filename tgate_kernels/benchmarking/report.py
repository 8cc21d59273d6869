"""Presenting a bench run: terminal tables, and JSON, CSV and PNG files."""

from __future__ import annotations

import csv
import json
import os
from typing import Iterable


def _tera(value) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{unit}"
    return f"{value:.0f}"


def _millions(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.3f}B" if value >= 1e9 else f"{value / 1e6:.3f}M"


def _fixed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = [list(map(str, row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, rule, *body])


def macs_table(results: dict) -> str:
    headers = ["model", "variant", "steps", "gate", "MACs", "ratio", "seed MACs", "seed ratio", "MACs+scores", "ratio+scores", "params", "seed params"]
    rows = [
        [
            r["label"],
            r["variant"],
            r["steps"],
            "-" if r["gate_step"] is None else r["gate_step"],
            _tera(r["macs"]),
            _fixed(r["macs_ratio"]),
            _tera(r["seed_macs"]),
            _fixed(r["seed_macs_ratio"]),
            _tera(r["macs_with_attention_scores"]),
            _fixed(r["macs_ratio_with_attention_scores"]),
            _millions(r["params"]),
            _millions(r["seed_params"]),
        ]
        for r in results["macs"]
    ]
    return format_table(headers, rows)


def latency_table(results: dict) -> str:
    headers = ["model", "variant", "px", "steps", "gate", "device", "median s", "vs baseline", "vs reference", "peak MB", "note"]
    rows = [
        [
            r["label"],
            r["variant"],
            r["resolution"],
            r["steps"],
            "-" if r["gate_step"] is None else r["gate_step"],
            f'{r["device"]}/{r["dtype"]}',
            _fixed(r["median_s"]),
            _fixed(r["latency_ratio"]),
            _fixed(r["latency_ratio_vs_reference"]),
            _fixed(r["peak_memory_mb"], 1),
            (r["error"] or "")[:60],
        ]
        for r in results["latency"]
    ]
    return format_table(headers, rows)


def bookkeeping_table(results: dict) -> str:
    headers = ["model", "variant", "steps", "Python calls/step", "added/step"]
    rows = [
        [r["model"], r["variant"], r["steps"], _fixed(r["calls_per_step"], 1), _fixed(r["added_calls_per_step"], 1)]
        for r in results["bookkeeping"]
    ]
    return format_table(headers, rows)


def render(results: dict) -> str:
    parts = ["MACs of a whole generation (denoiser), seed document's settings", macs_table(results), "", results["macs_convention"]]
    if results["latency"]:
        parts += ["", "Latency (" + results["latency_scope"] + ")", latency_table(results)]
        measure = results["latency"][0]["memory_measure"]
        parts.append(f"peak memory: {measure}")
    if results["bookkeeping"]:
        parts += ["", "Python function calls per denoising step", bookkeeping_table(results)]
    if results["notes"]:
        parts += ["", *results["notes"]]
    return "\n".join(parts)


def _csv_rows(results: dict) -> tuple[list[str], list[dict]]:
    rows: list[dict] = []
    for table in ("macs", "latency", "bookkeeping"):
        for row in results[table]:
            flat = {"table": table}
            for key, value in row.items():
                flat[key] = ";".join(f"{v:.6f}" for v in value) if isinstance(value, list) else value
            rows.append(flat)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns, rows


def write_json(results: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def write_csv(results: dict, path: str) -> None:
    columns, rows = _csv_rows(results)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(results: dict, path: str) -> None:
    """MACs ratio (from the schedule, every gate step) and measured latency ratio vs gate step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (macs_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_model: dict[str, list[dict]] = {}
    for row in results["macs_sweep"]:
        by_model.setdefault(row["model"], []).append(row)
    for model, rows in by_model.items():
        macs_axis.plot([r["gate_step"] for r in rows], [r["macs_ratio"] for r in rows], marker=".", label=f"{model} ({rows[0]['steps']} steps)")
    macs_axis.set_title("MACs ratio T-GATE / baseline (attention scores excluded)")
    macs_axis.set_xlabel("gate_step")
    macs_axis.set_ylabel("ratio")
    macs_axis.grid(alpha=0.3)
    if by_model:
        macs_axis.legend(fontsize=7)

    latency_by: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in results["latency"]:
        if row["gate_step"] is not None and row["latency_ratio"] is not None:
            latency_by.setdefault((row["model"], row["variant"]), []).append((row["gate_step"], row["latency_ratio"]))
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


def write_all(results: dict, directory: str, plot: bool = True) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    paths = {
        "json": os.path.join(directory, "bench.json"),
        "csv": os.path.join(directory, "bench.csv"),
        "table": os.path.join(directory, "bench.txt"),
    }
    write_json(results, paths["json"])
    write_csv(results, paths["csv"])
    with open(paths["table"], "w", encoding="utf-8") as handle:
        handle.write(render(results) + "\n")
    if plot:
        paths["png"] = os.path.join(directory, "bench.png")
        write_plot(results, paths["png"])
    return paths
