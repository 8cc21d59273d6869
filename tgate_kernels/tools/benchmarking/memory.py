"""Peak memory of one call, on whatever device runs it.

* CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call: the peak
  of live tensor memory the call added (activations, caches), weights excluded.
* CPU: PyTorch allocates tensors with the system allocator, which ``tracemalloc`` cannot see. The
  process's resident set size is sampled every millisecond by a background thread and the peak
  above the pre-call RSS is reported; freed heap pages are handed back to the system first
  (``malloc_trim`` on glibc) so the pre-call RSS is a floor. It measures the same thing as on
  CUDA, with page granularity and sampling jitter (a few MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import threading

import torch


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """``with PeakMemory(device) as peak: work()`` then ``peak.bytes``."""

    def __init__(self, device: str | torch.device, interval_s: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss = 0
        self._start = 0

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "peak CUDA memory allocated during the call above the memory allocated before it"
        return "peak process RSS during the call above the RSS before it (1 ms sampling)"

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
        self._start = self._peak_rss = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_rss = max(self._peak_rss, _rss_bytes())

    def __exit__(self, *exc_info) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak_rss = max(self._peak_rss, _rss_bytes())
        self.bytes = self._peak_rss - self._start
        return False
