"""Summary table for bench_ops.py: fused-vs-eager ratio and achieved bandwidth per shape."""

from __future__ import annotations

import sys

import pytest

from bench_ops import RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("post_gate_residual_norm: median time, speed-up over eager, achieved bandwidth")
    write("(bytes = inputs read once + outputs written once, the fused op's minimum traffic;\n"
          " copy GB/s = a device-to-device copy of the same byte count, GPU only)")
    header = f"{'case':<34} {'eager ms':>9} {'fused ms':>9} {'speed-up':>8} {'eager GB/s':>10} {'fused GB/s':>10} {'copy GB/s':>9}"
    write(header)
    write("-" * len(header))
    for case, row in sorted(RESULTS.items()):
        if "eager" not in row or "fused" not in row:
            continue
        gb = row["bytes"] / 1e9
        copy = f"{row['copy_gbps']:9.1f}" if "copy_gbps" in row else f"{'-':>9}"
        write(
            f"{case:<34} {row['eager'] * 1e3:9.3f} {row['fused'] * 1e3:9.3f} "
            f"{row['eager'] / row['fused']:7.2f}x {gb / row['eager']:10.1f} {gb / row['fused']:10.1f} {copy}"
        )
    sys.stdout.flush()
