"""One call under ``torch.profiler``, for the benchmarks' ``--profile`` options: is a slow case
host- or device-bound, and which ops take its time."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch


def profile_call(fn: Callable[[], Any], device: torch.device, path: Path, rows: int = 30) -> dict[str, Any]:
    """``fn()`` under torch.profiler: its wall time, the device's busy time (sum of kernel self
    times; kernels on two streams at once count twice) and the aten op count; the op tables go to
    ``path``: the top ``rows`` by device time (CUDA), then by self host time (what a host-bound
    eager step spends its time on)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    tables = ([ka.table(sort_by="self_device_time_total", row_limit=rows)] if cuda else []) + [
        ka.table(sort_by="self_cpu_time_total", row_limit=rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))
    return {"wall_ms": wall_ms,
            "device_busy_ms": sum(e.self_device_time_total for e in ka) / 1e3 if cuda else None,
            "aten_ops": sum(e.count for e in ka if e.key.startswith("aten::")), "table": path.name}
