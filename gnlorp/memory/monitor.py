"""Measure a run's memory as it goes: the CUDA allocator's counters, or the process RSS on CPU.

On CUDA the allocator's own counters are exact. On CPU the only honest number is the process's
resident set size; its peak is caught by a light sampling thread and reported above the baseline taken
before the model was loaded (RSS does not shrink when memory is freed, so compare runs in fresh processes).
"""

from __future__ import annotations

import threading

import psutil
import torch


class MemoryMonitor:
    """Current and peak memory of this process (bytes above the baseline at construction on CPU)."""

    def __init__(self, device: torch.device, interval_s: float = 0.02):
        self.cuda = device.type == "cuda"
        self._process = psutil.Process()
        self._baseline = 0 if self.cuda else self._process.memory_info().rss
        self._peak = 0
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = None if self.cuda else threading.Thread(target=self._sample, daemon=True, name="gnlorp-mem")
        if self._thread is not None:
            self._thread.start()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        return max(0, self._process.memory_info().rss - self._baseline)

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return max(self._peak, self.current())

    def close(self) -> None:
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.current())
