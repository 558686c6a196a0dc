"""Process-wide execution switches, decided here and nowhere else, changed only in scopes.

- ``decode_graphs(enabled)``: eager decode steps replay adapted modules as CUDA graphs
  (``layers/decode_graphs.py``); on by default.
- ``kernel_backend(name)``: which implementation the adapter kernels use. ``"auto"`` (default):
  Triton on CUDA tensors, torch elsewhere; ``"triton"``: Triton also on CPU tensors, which needs
  the Triton interpreter (``TRITON_INTERPRET=1`` before Triton is imported; tests use it);
  ``"torch"``: the torch reference paths everywhere (the eager twin of every kernel, also on GPU).

Both are context managers that restore the previous value on exit, also after an exception::

    with moelora.decode_graphs(False), moelora.kernel_backend("torch"):
        out = model.generate(ids)            # the plain eager torch paths

``triton_kernels_for(x)`` is the one function the layers ask whether to launch a Triton kernel.
No environment variable is read here: a setting is what the code in scope says it is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "torch")


@dataclass
class _Settings:
    decode_graphs: bool = True
    kernel_backend: str = "auto"


SETTINGS = _Settings()


@contextlib.contextmanager
def decode_graphs(enabled: bool = True) -> Iterator[None]:
    """Turn the eager-decode CUDA graphs on or off inside the block (see module docstring).
    Turning them off also frees the graphs captured so far."""
    old = SETTINGS.decode_graphs
    SETTINGS.decode_graphs = bool(enabled)
    if not enabled:
        from .layers.decode_graphs import clear_decode_graphs

        clear_decode_graphs()
    try:
        yield
    finally:
        SETTINGS.decode_graphs = old


def decode_graphs_enabled() -> bool:
    return SETTINGS.decode_graphs


@contextlib.contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Pick the adapter kernels' implementation inside the block: auto | triton | torch."""
    if name not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not torch.cuda.is_available() and not _interpreted():
        raise RuntimeError("kernel_backend('triton') without CUDA needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 in the environment before starting Python")
    old = SETTINGS.kernel_backend
    SETTINGS.kernel_backend = name
    try:
        yield
    finally:
        SETTINGS.kernel_backend = old


def _interpreted() -> bool:
    from moelora_kernels import backend

    return backend.interpreted()


def triton_kernels_for(x: torch.Tensor) -> bool:
    """Whether the adapter code should launch a Triton kernel on tensor ``x`` (vs its torch twin)."""
    b = SETTINGS.kernel_backend
    if b == "torch":
        return False
    if x.is_cuda:
        return True
    return b == "triton" and _interpreted()  # CPU tensors: only in Triton's interpreter
