"""Peak memory of a stage: CUDA max-allocated on GPU, sampled peak RSS of this process on CPU."""
from __future__ import annotations

import threading

import psutil


class PeakMemory:
    """Context manager; `.peak_bytes` after exit. On CPU a thread samples RSS every `interval` s,
    because ru_maxrss is the whole process's lifetime peak and cannot be reset per stage."""

    def __init__(self, device: str = "cpu", interval: float = 0.05):
        self.device, self.interval, self.peak_bytes = device, interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
