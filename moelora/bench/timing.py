"""The one timing helper of ``moelora.bench`` and ``kernels/benchmarks/``.

On CUDA a call is timed with CUDA events (the GPU's own clock: asynchronous launches are not
mistaken for finished work); elsewhere with ``time.perf_counter``. Untimed warm-up calls come
first (compilation, autotuning, allocator growth), then ``repeats`` timed calls; report the median
(``median_ms``), and the spread with ``percentile`` / min / max.

- ``time_call_ms(fn)``: one call; on CUDA the device is synchronised before, and the end event is
  waited for, so the time covers exactly ``fn``'s work.
- ``time_ms(fn, warmup, repeats)``: per-call times of several calls. ``back_to_back=True`` (CUDA)
  records all events without synchronising in between, so the GPU never idles between calls and
  the times are device time per call (kernel micro-benchmarks); the default synchronises around
  each call, as an application calling ``fn`` once would see it.
- ``device``: ``None`` = CUDA if available; ``"cpu"`` = host wall clock without any
  synchronisation, also for CUDA work (what launching it costs the host).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _use_cuda(device: Any) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def time_call_ms(fn: Callable[[], Any], device: Any = None) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on CUDA, perf_counter elsewhere)."""
    if _use_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3, device: Any = None,
            back_to_back: bool = False) -> list[float]:
    """Per-call milliseconds of ``repeats`` calls after ``warmup`` untimed ones (module docstring)."""
    for _ in range(warmup):
        fn()
    if back_to_back and _use_cuda(device):
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    return [time_call_ms(fn, device) for _ in range(repeats)]


def median_ms(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3, device: Any = None,
              back_to_back: bool = False) -> float:
    """The median of ``time_ms``."""
    return statistics.median(time_ms(fn, warmup, repeats, device, back_to_back))


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``xs``, linear between order statistics (numpy's default;
    ``statistics.quantiles(method="inclusive")`` gives the same values)."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median_or_none(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None
