"""One call under ``torch.profiler``, for the benchmarks' ``--profile`` options: is a slow case
host- or device-bound, and which ops take its time."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


@contextmanager
def profiled(device: torch.device, path: Path, rows: int = 30, out: dict | None = None) -> Iterator[dict[str, Any]]:
    """The block under ``torch.profiler``; the yielded dict is filled on exit with its wall time, the
    device's busy time (sum of kernel self times; kernels on two streams at once count twice) and
    the aten op count; the op tables go to ``path``: the top ``rows`` by device time (CUDA), then by
    self host time (what a host-bound eager step spends its time on). Around one step of a loop
    (``concurrent_training.train_steps``' ``around_step``) it profiles that step and not the setup
    around it. ``out``: the dict to fill (for a caller that does not see the ``with``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {} if out is None else out
    if cuda:
        torch.cuda.synchronize()  # the queue of earlier work is not this block's device time
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        yield out
        if cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    tables = ([ka.table(sort_by="self_device_time_total", row_limit=rows)] if cuda else []) + [
        ka.table(sort_by="self_cpu_time_total", row_limit=rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables))
    out.update({"wall_ms": wall_ms,
                "device_busy_ms": sum(e.self_device_time_total for e in ka) / 1e3 if cuda else None,
                "aten_ops": sum(e.count for e in ka if e.key.startswith("aten::")), "table": path.name})


def profile_call(fn: Callable[[], Any], device: torch.device, path: Path, rows: int = 30) -> dict[str, Any]:
    """``fn()`` under torch.profiler (``profiled``): its wall time, device busy time, aten ops, tables."""
    with profiled(device, path, rows) as out:
        fn()
    return out
