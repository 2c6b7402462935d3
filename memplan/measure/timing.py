"""Clocks for step and phase times: CUDA events on the GPU, time.perf_counter on the CPU.

A clock hands out opaque marks; elapsed(a, b) is the time between two marks in seconds. CUDA events are
recorded on the current stream, so they time what the GPU ran, not when the host enqueued it; elapsed() is only
read after sync() (one torch.cuda.synchronize per step, as a training loop that logs its loss syncs anyway).
"""
from __future__ import annotations

import statistics
import time


class CpuClock:
    def mark(self) -> float:
        return time.perf_counter()

    def elapsed(self, a: float, b: float) -> float:
        return b - a

    def sync(self) -> None:
        pass


class CudaClock:
    """Marks are CUDA events recorded on the current stream; `cuda` is torch.cuda or a stand-in with Event and
    synchronize (memplan.measure.cuda.TorchCuda, or the tests' simulation)."""

    def __init__(self, cuda=None):
        if cuda is None:
            import torch

            cuda = torch.cuda
        self._cuda = cuda

    def mark(self):
        e = self._cuda.Event(enable_timing=True)
        e.record()
        return e

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0  # elapsed_time is in milliseconds

    def sync(self) -> None:
        self._cuda.synchronize()


def summarize(times: list[float]) -> dict:
    """{"median", "mean", "min", "all"} of step times in seconds (the schema's step_time_s)."""
    if not times:
        return {"median": None, "mean": None, "min": None, "all": []}
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times),
            "all": [float(t) for t in times]}
