"""Which compiled variant each kernel launch asks for, recorded on any backend (the interpreter too).

Triton compiles a kernel once per *variant*: its constexpr values, launch options (``num_warps``
...), argument dtypes, and the specialisation of the other arguments: an int is specialised on
being 1 and on being a multiple of 16 (unless the kernel lists it in ``do_not_specialize``) and
on fitting in int32, a tensor on its data pointer being 16-byte aligned. A launch of a variant
not seen before compiles it (0.3-0.7 s each on the H100, 7B shapes): inside a serving step that
is a stall. ``recording()`` patches every launched kernel of the package (the module-level
``*_kernel`` functions) with a recorder of that key, so a test on CPU, under Triton's
interpreter, can show that a warm-up launches every variant that later steps launch
(``tests/test_serve_step_graphs.py``), without a GPU to compile on.

It models Triton's rule rather than reading Triton's private cache key (which moves between
releases; ``moelora._private.triton_compiles`` counts the real compiles on the GPU).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch

from . import gathered_lora, lora_decode, merge, mixlora_ffn

__all__ = ["recording", "launch_key", "KERNEL_MODULES"]

KERNEL_MODULES = (gathered_lora, lora_decode, merge, mixlora_ffn)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _int_class(v: int) -> str:
    return "i32" if -2**31 <= v < 2**31 else "i64"


def _kernel_name(kernel) -> str:
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](...)`` records the launch's key, then runs it (or not)."""

    def __init__(self, kernel, keys: set, run: bool) -> None:
        self.kernel, self.keys, self.run = kernel, keys, run
        self.__name__ = _kernel_name(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.add(launch_key(self.kernel, args, kwargs))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None
        return launch


def _params(kernel) -> list[tuple[str, bool, bool]]:
    """(name, is_constexpr, do_not_specialize) of each parameter, for either backend's function."""
    if hasattr(kernel, "params"):  # JITFunction
        return [(p.name, bool(p.is_constexpr), bool(p.do_not_specialize)) for p in kernel.params]
    dns = set(kernel.kwargs.get("do_not_specialize") or ())  # InterpretedFunction
    sig = inspect.signature(kernel.fn).parameters
    return [(n, "constexpr" in str(sig[n].annotation), n in dns) for n in kernel.arg_names]


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The variant a launch of ``kernel`` with these arguments compiles (module docstring)."""
    params = _params(kernel)
    values = dict(zip((p[0] for p in params), args))
    values.update((k, v) for k, v in kwargs.items() if k not in _OPTIONS)
    spec = []
    for name, const, dns in params:
        v = values.get(name)
        if const or v is None:
            s = v
        elif isinstance(v, torch.Tensor):
            s = (str(v.dtype), v.data_ptr() % 16 == 0)
        elif isinstance(v, bool):
            s = "i1"
        elif isinstance(v, int):
            s = _int_class(v) if dns else (_int_class(v), v == 1, v % 16 == 0)
        elif isinstance(v, float):
            s = "fp32"
        else:
            s = type(v).__name__
        spec.append((name, s))
    opts = tuple(sorted((k, v) for k, v in kwargs.items() if k in _OPTIONS))
    return (_kernel_name(kernel), tuple(spec), opts)


@contextlib.contextmanager
def recording(run: bool = True) -> Iterator[set]:
    """Record the key (``launch_key``) of every kernel launch of the package inside the block into
    the set it yields; ``run=False`` records without running (outputs stay unwritten). Restores
    the kernels on exit and on exception."""
    keys: set = set()
    patched = []
    for mod in KERNEL_MODULES:
        for name, value in list(vars(mod).items()):
            # only the launched kernels: a @triton.jit helper is called from inside kernels,
            # which look it up in the module, so it must stay itself
            if name.endswith("_kernel") and type(value).__name__ in ("JITFunction", "InterpretedFunction"):
                patched.append((mod, name, value))
                setattr(mod, name, _Recorder(value, keys, run))
    try:
        yield keys
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)
