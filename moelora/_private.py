"""Every use of a dependency's private or unstable API by the moelora core, in one place.

Tested with torch 2.13 and transformers 5.17-5.24 (``TESTED``); ``tests/test_private_api.py``
fails with a message naming the attribute when one of these moves.

- ``torch.Tensor._version``: the in-place version counter. A merged weight whose counter moved
  was overwritten by someone else (``load_state_dict``), so a saved pristine copy is stale.
- ``nn.Module._modules``: the dict behind ``nn.ModuleDict``; one ``.get`` per adapted module call
  on the decode hot path instead of ``in`` + ``[]`` (two lookups through ``__getattr__``).
- transformers' ``DynamicCache.get_seq_length()`` and where ``forward`` receives the cache.
- transformers' ``GenerationMixin._prepare_static_cache(cache_implementation, batch_size,
  max_cache_len, ...)`` and ``_previous_max_cache_length``: where ``generate(cache_implementation=
  "static")`` makes its cache (a new one per call in 5.x); ``ReusedStaticCache`` overrides it.
- torch's loggers ``torch._inductor.cudagraph_trees`` and its artifact logger ``.__cudagraphs``,
  with their debug line "Recording function=": ``cudagraph_records`` counts CUDA-graph
  recordings (benchmarks report re-records with it).
- ``nn.Module._apply``: the one method ``.to()``/``.half()``/``.cuda()`` route every tensor
  through; ``Float32Params`` overrides it so routers stay fp32 when the model is cast to 16 bits.
- triton's ``knobs.runtime.jit_cache_hook`` / ``jit_post_compile_hook`` (called before and after
  each kernel compile, keyword arguments ``key``, ``repr``, ``fn``, ...): ``triton_compiles``
  counts and times the compiles inside a block (the serving benchmark reports them per run).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

TESTED = {"torch": ">=2.9,<2.14", "transformers": ">=5.17,<5.25"}


def tensor_stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's storage and contents, cheaply: (data_ptr, dtype, device, version)."""
    return (t.data_ptr(), t.dtype, t.device, t._version)


def version_stamps(tensors) -> list[tuple[torch.Tensor, tuple]]:
    """(tensor, ``tensor_stamp``) pairs: what a cache built from ``tensors`` was built from."""
    return [(t, tensor_stamp(t)) for t in tensors]


def stamps_match(stamps, tensors) -> bool:
    """The same tensor objects as ``stamps``, on the same storage (``.to()``/``.half()`` swap a
    parameter's storage, not the object) and none written in place since."""
    return len(stamps) == len(tensors) and all(t is u and tensor_stamp(t) == v for (t, v), u in zip(stamps, tensors))


def stamp_change(t: torch.Tensor, stamp: tuple | None) -> str | None:
    """None: unchanged since ``stamp``; "moved": new storage (``.to()``, ``.half()``, deepcopy);
    "overwritten": same storage written in place by someone else."""
    if stamp is None:
        return None
    if (t.data_ptr(), t.dtype, t.device) != stamp[:3]:
        return "moved"
    if t._version != stamp[3]:
        return "overwritten"
    return None


class Float32Params(nn.Module):
    """A module whose parameters stay float32 when the model is cast to a 16-bit dtype
    (``model.half()``, ``model.to(torch.bfloat16)``); device moves and float64 apply as usual.
    The routers' softmax/top-k decision is sensitive to rounding (moelora/layers/router.py)."""

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return out


def mark_static_inputs(obj) -> None:
    """Mark every tensor in ``obj`` (a tensor, or dicts / tuples / lists of them) as a static input
    of compiled graphs (``torch._dynamo.mark_static_address``, ``guard=False``): CUDA-graph trees
    read it in place instead of copying it into the graph's own buffer at every replay, and a new
    tensor in its place re-records the graph rather than recompiling it."""
    if isinstance(obj, torch.Tensor):
        torch._dynamo.mark_static_address(obj, guard=False)
    elif isinstance(obj, dict):
        for v in obj.values():
            mark_static_inputs(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            mark_static_inputs(v)


def module_dict_get(md: nn.ModuleDict, key):
    """``md[key]`` or None, in one dict lookup (the decode hot path)."""
    return md._modules.get(key)


def frozen_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, linear.weight, linear.bias)`` with one dict read for the parameters, not two
    ``nn.Module.__getattr__`` calls (the merged decode hot path: 224 linears a token, host-bound)."""
    params = linear._parameters
    return F.linear(x, params["weight"], params.get("bias"))


def submodule(module: nn.Module, name: str) -> nn.Module:
    """``getattr(module, name)`` for a registered child, in one dict read (decode hot path)."""
    return module._modules[name]


def cached_tokens(kwargs: dict) -> int:
    """Tokens already held by the forward's dynamic KV cache (read off a tensor shape: no host
    sync). 0 for no cache, a static cache (its length is a device-side count) and under
    torch.compile. (transformers 5.17 passes the cache as ``past_key_values``, later 5.x as
    ``cache``.)"""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None or torch.compiler.is_compiling():
        return 0
    from transformers import DynamicCache

    return int(cache.get_seq_length()) if isinstance(cache, DynamicCache) else 0


class ReusedStaticCache:
    """Mixin of the adapted model class (``moelora/generation.py``): ``generate(cache_implementation=
    "static")`` reuses ONE ``StaticCache`` (reset) across calls instead of transformers 5.x's new one
    per call, as transformers 4.x did (``model._cache``).

    Why: the KV tensors are static inputs of the compiled decode step (``mark_static_address``),
    and CUDA-graph trees record a graph per set of static-input addresses, so a new cache at new
    addresses re-records the whole decode graph (issue 19; measured on the H200 with transformers
    5.17: a re-record on some calls for the base and each method, as the caching allocator happened
    to hand the old blocks back or not). With one cache the addresses never change.

    The cache lives in ``model.moelora_state.generation_cache`` (one at most, replaced when the
    batch size, dtype, device or kind changes or a longer one is needed; freed by
    ``remove_adapter``). Not reused when the caller gets the cache back
    (``return_dict_in_generate``): ``AdapterState.hand_out_cache`` then makes this call's fresh."""

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        from transformers import StaticCache

        state = self.moelora_state
        key = (cache_implementation, int(batch_size), self.device, self.dtype)
        held = state.generation_cache
        if not state.hand_out_cache and held is not None and held[0] == key and held[1] >= max_cache_len:
            held[2].reset()
            return held[2]
        cache = super()._prepare_static_cache(cache_implementation, batch_size, max_cache_len, *args, **kwargs)
        if not state.hand_out_cache and type(cache) is StaticCache and not getattr(cache, "offloading", False):
            length = max(int(max_cache_len), int(getattr(self, "_previous_max_cache_length", max_cache_len)))
            state.generation_cache = (key, length, cache)
        return cache


class _RecordCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Recording function=" in str(record.msg):
            self.count += 1


CUDAGRAPH_LOGGER = "torch._inductor.cudagraph_trees"


@contextlib.contextmanager
def cudagraph_records() -> Iterator[_RecordCounter]:
    """Count the CUDA graphs torch.compile's cudagraph trees record inside the block (``.count``;
    the first recording of a compiled function and every re-record, e.g. "static input data
    pointer changed"). Reads the debug log of ``torch._inductor.cudagraph_trees`` (and of its
    artifact logger ``...cudagraph_trees.__cudagraphs``, where torch 2.x logs the line), which is
    otherwise silent: the block turns their debug level on and, so that none of those debug lines
    (tens of MB of stack traces per run on the GPU) reach the user's console, hands their records
    to the counter alone; levels, handlers and propagation are restored on exit."""
    counter = _RecordCounter()
    names = (CUDAGRAPH_LOGGER, CUDAGRAPH_LOGGER + ".__cudagraphs")
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level, lg.propagate, lg.handlers[:]) for lg in loggers]
    for lg in loggers:
        lg.handlers = [counter]  # each record is counted once: none propagates past its logger
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield counter
    finally:
        for lg, level, propagate, handlers in saved:
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate


class _CompileLog:
    """What ``triton_compiles`` saw: ``count`` compiles, ``seconds`` in them, ``kernels`` the name,
    duration and variant (the arguments' types and specialisations, constexpr values included: what
    made this launch compile) of each, in compile order."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.kernels: list[tuple[str, float, str]] = []
        self._started: dict[int, float] = {}

    def as_dict(self, limit: int = 8) -> dict:
        return {"count": self.count, "seconds": round(self.seconds, 3),
                "kernels": [[name, round(s, 3), variant] for name, s, variant in self.kernels[:limit]]}


@contextlib.contextmanager
def triton_compiles() -> Iterator[_CompileLog]:
    """Count the Triton kernels compiled inside the block, with their names and compile seconds
    (``.count``, ``.seconds``, ``.kernels``). A step that waited for a compile is invisible in a
    step-time histogram otherwise. Chains any hooks already installed (they still run and decide)
    and restores them on exit. The interpreter (``TRITON_INTERPRET=1``) compiles nothing: 0."""
    from triton import knobs

    rt = knobs.runtime
    pre_before, post_before = rt.jit_cache_hook, rt.jit_post_compile_hook
    log = _CompileLog()

    def pre(*args, **kwargs):
        log._started[id(kwargs.get("key"))] = time.perf_counter()
        return pre_before(*args, **kwargs) if pre_before else None

    def post(*args, **kwargs):
        now = time.perf_counter()
        start = log._started.pop(id(kwargs.get("key")), now)
        fn = kwargs.get("fn")
        log.count += 1
        log.seconds += now - start
        text = str(kwargs.get("repr", "?"))
        name = getattr(fn, "name", None) or text.split("[")[0]
        # the variant: the argument types/specialisations and constexpr values that made it compile
        info = kwargs.get("compile") or {}
        variant = f"signature={info.get('signature')} constants={info.get('constants')}" if info else text
        log.kernels.append((name.rsplit(".", 1)[-1], now - start, variant[:1000]))
        return post_before(*args, **kwargs) if post_before else None

    rt.jit_cache_hook, rt.jit_post_compile_hook = pre, post
    try:
        yield log
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = pre_before, post_before
