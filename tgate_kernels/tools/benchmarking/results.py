"""The rows of a ``tgate-kernels bench`` run, typed, and how they serialise to JSON and CSV."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field


@dataclass
class MacsRow:
    """MACs and params of one whole generation at the published settings of an architecture."""

    model: str
    label: str
    variant: str
    steps: int
    resolution: int
    gate_step: int | None
    macs: int
    macs_with_attention_scores: int
    macs_ratio: float
    macs_ratio_with_attention_scores: float
    params: int
    params_after_gate_with_norms: int | None = None
    published_macs: float | None = None
    published_macs_ratio: float | None = None
    published_params: float | None = None
    macs_floor_any_schedule: int | None = None
    """The fewest MACs any schedule reaches at this gate (self-attention skipped at every step)."""
    macs_floor_any_schedule_with_attention_scores: int | None = None
    per_sample_forward_macs: int | None = None
    per_sample_self_attention_macs: int | None = None
    per_sample_cross_attention_macs: int | None = None


@dataclass
class MacsSweepRow:
    """The MACs ratio T-GATE / baseline at one gate step, from the schedule."""

    model: str
    steps: int
    gate_step: int
    macs_ratio: float
    macs_ratio_with_attention_scores: float


@dataclass
class LatencyRow:
    model: str
    label: str
    variant: str
    resolution: int
    steps: int
    gate_step: int | None
    device: str
    dtype: str
    repeats: int
    seconds: list[float]
    median_s: float | None
    latency_ratio: float | None
    latency_ratio_vs_reference: float | None
    macs_ratio: float | None
    """What the MACs of the timed settings predict for ``latency_ratio``."""
    peak_memory_mb: float | None
    memory_measure: str
    first_call_s: float | None = None
    """The untimed first call (the compiled variant compiles there)."""
    first_call_peak_memory_mb: float | None = None
    error: str | None = None


@dataclass
class ResolutionRow:
    """T-GATE's latency ratio at one image size, next to what its MACs predict."""

    model: str
    resolution: int
    steps: int
    gate_step: int
    device: str
    dtype: str
    baseline_s: float | None
    tgate_s: float | None
    latency_ratio: float | None
    macs_ratio: float
    """MACs with the attention scores, which grow fastest with the image."""
    macs_ratio_without_attention_scores: float


@dataclass
class PythonCallsRow:
    """Python function calls per denoising step: the bookkeeping an accelerator adds."""

    model: str
    variant: str
    steps: int
    gate_step: int | None
    resolution: int
    python_calls: int
    calls_per_step: float
    added_calls_per_step: float


@dataclass
class ThroughputRow:
    """Images per second of the denoiser alone at one batch of prompts: baseline against eager
    T-GATE."""

    model: str
    label: str
    prompts: int
    resolution: int
    steps: int
    gate_step: int
    device: str
    dtype: str
    rounds: int
    baseline_images_per_s: float
    tgate_images_per_s: float
    latency_ratio: float
    macs_ratio: float


@dataclass
class BenchResults:
    environment: dict
    settings: dict
    macs_convention: str
    latency_scope: str
    macs: list[MacsRow] = field(default_factory=list)
    macs_sweep: list[MacsSweepRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    resolutions: list[ResolutionRow] = field(default_factory=list)
    python_calls: list[PythonCallsRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    TABLES = ("macs", "macs_sweep", "latency", "resolutions", "python_calls", "throughput")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    def write_csv(self, path: str) -> None:
        """One CSV of every row, the ``table`` column saying which table it belongs to."""
        rows = []
        for table in self.TABLES:
            for row in getattr(self, table):
                flat = {"table": table}
                for key, value in dataclasses.asdict(row).items():
                    flat[key] = ";".join(f"{v:.6f}" for v in value) if isinstance(value, list) else value
                rows.append(flat)
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
