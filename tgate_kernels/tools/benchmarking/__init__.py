"""Benchmarks of T-GATE on real architectures (random weights): MACs, params, latency, peak
memory, Python bookkeeping, image fidelity; the ``tgate-kernels`` CLI presents them."""
