"""Where the kernels run: Triton's interpreter or the GPU, and the GPU's facts the launchers need.

``interpreted()`` is the one answer to "does Triton run in its interpreter?" for the package.
Triton decides it when a function is decorated with ``@triton.jit`` (from ``TRITON_INTERPRET``,
through ``triton.knobs.runtime.interpret``), so this module asks Triton the same way: it decorates
a probe at import and checks whether the result is an ``InterpretedFunction``. The kernel modules
import this module before they define their kernels and check (``require_same_backend``) that
theirs were decided alike: setting ``TRITON_INTERPRET`` between two imports of the package fails
loudly instead of leaving half the kernels interpreted.

``sm_count(device)`` and ``gpu_name(device)`` are read once per CUDA device index and cached
(eager decode is host-bound: no property query per launch). On CPU tensors and under the
interpreter ``sm_count`` returns ``FALLBACK_SM_COUNT`` (132, the H100 SXM's count the grids
were first sized for), so grids, and with them CPU results, do not depend on the machine, and
``gpu_name`` returns ``""`` (the default row of ``tiles.py``).
"""
from __future__ import annotations

import os

import torch
import triton

__all__ = ["interpreted", "sm_count", "gpu_name", "check_device", "require_same_backend", "FALLBACK_SM_COUNT"]

FALLBACK_SM_COUNT = 132  # CPU / interpreter: a fixed grid size, so results do not depend on the host


def _is_interpreted_fn(fn) -> bool:
    """Whether ``fn`` (a @triton.jit result) was built for Triton's interpreter."""
    return type(fn).__name__ == "InterpretedFunction"


@triton.jit
def _probe():
    pass


_INTERPRETED = _is_interpreted_fn(_probe)
_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")


def interpreted() -> bool:
    """True when Triton runs the package's kernels in its interpreter (CPU tensors allowed)."""
    return _INTERPRETED


def require_same_backend(*kernels) -> None:
    """Raise if any of ``kernels`` (@triton.jit results) was decorated for the other backend
    than this module's probe, i.e. TRITON_INTERPRET changed between imports of the package."""
    for k in kernels:
        if _is_interpreted_fn(k) != _INTERPRETED:
            raise RuntimeError(
                f"{getattr(k, '__name__', k)} was built {'for' if not _INTERPRETED else 'without'} Triton's "
                f"interpreter, but moelora_kernels.backend was imported "
                f"{'with' if _INTERPRETED else 'without'} it (TRITON_INTERPRET={_ENV_AT_IMPORT!r} then, "
                f"{os.environ.get('TRITON_INTERPRET')!r} now): set TRITON_INTERPRET before the first import of "
                f"triton or moelora_kernels and leave it")


def check_device(x: torch.Tensor, name: str, reference: str | None = None) -> None:
    """The launchers' guard: CUDA tensors, or any tensor under the interpreter."""
    if x.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 set before triton and "
                           f"moelora_kernels are imported, to run on CPU in Triton's interpreter)"
                           + (f"; use {reference} otherwise" if reference else ""))


def _cuda_index(device: torch.device) -> int | None:
    """The CUDA device index whose properties apply, or None (CPU, interpreter)."""
    if device.type != "cuda" or _INTERPRETED:
        return None
    return torch.cuda.current_device() if device.index is None else device.index


_SM_COUNTS: dict[int, int] = {}
_GPU_NAMES: dict[int, str] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, cached per CUDA device index;
    ``FALLBACK_SM_COUNT`` on CPU and under the interpreter."""
    i = _cuda_index(device)
    if i is None:
        return FALLBACK_SM_COUNT
    n = _SM_COUNTS.get(i)
    if n is None:
        n = _SM_COUNTS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return n


def gpu_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` of ``device``, cached per index; "" on CPU / interpreter."""
    i = _cuda_index(device)
    if i is None:
        return ""
    name = _GPU_NAMES.get(i)
    if name is None:
        name = _GPU_NAMES[i] = torch.cuda.get_device_name(i)
    return name
