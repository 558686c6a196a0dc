"""CUDA graphs for the adapter math of eager decoding ("piecewise" graphs, as vLLM captures them).

Eager decode of a 7B model at small batch is host-bound: the GPU work of a decode step is ~6 ms,
its host time ~30 ms (docs/anchors.md), and an adapted module adds host time, not GPU time: a frozen
GEMM plus its LoRA delta is 2-3 launches (``F.linear`` ~20 µs of host time each, a Triton launch
~55 µs on the H100 host), a MixLoRA FFN five launches and its bookkeeping. Here each adapted
module captures its decode math (frozen GEMMs + adapter kernels) once per input shape into a CUDA
graph and then replays it: one copy into the graph's static input and one replay, ~2 host
operations whatever the number of kernels inside. torch.compile'd decoding makes its own graphs
(``moelora_kernels.ops``) and never comes here.

When it applies: CUDA tensors, inference (the caller checked no grad, eval mode and at most
``DECODE_MAX_TOKENS`` tokens), not under torch.compile, not inside another capture (``applies``),
and only at cached decode steps: the forward's DynamicCache already holds tokens
(``RoutingContext.cached_decode_step``), never at a prefill, whose outputs the cache may keep by
reference. LoRA-Switch merge mode runs plain ``F.linear`` on the merged weights and needs none. A
shape is captured the second time it is seen: the first call runs the kernels directly, which
compiles them before any capture. Measured on the H200 (experiments/2026-12-01_decode_graphs_h200):
MixLoRA eager decode 1.67x -> 1.04-1.23x base, LoRA 1.94x (H100) -> 1.25x.

**Contract** (the same as torch.compile's ``mode="reduce-overhead"``): what a graphed module
returns is the graph's static output, overwritten by that module's next call with the same shape.
Hugging Face decoder layers consume it at once (residual add, RoPE, copy into the KV cache); a
forward hook that keeps a module's output across decode steps must ``.clone()`` it. Turn the
graphs off for a block with ``with moelora.decode_graphs(False): ...`` (``moelora/switches.py``).

**Serving steps** (``step_applies``): the serving engine's packed steps mix decode tokens and
short prefill chunks of many requests, so their token count changes from step to step, and
their KV cache is paged: keys and values are copied into its blocks, so every adapted module's
output is consumed within the step (``BatchPlan.graph_step``). A mixed step of at most
``DECODE_MAX_TOKENS`` tokens pads each site's input to a bucket (``bucket``: 8, 16, 32, 64
tokens) and replays that bucket's graph. Why: on the H200 host a mixed step of the 7B shape at 16
tokens spent 129 ms in its 224 adapted linears (12 aten ops and ~3 Triton launches each) and 63 ms
in its 32 MixLoRA FFNs, against a 70 ms base step (experiments/2026-12-02_serve_step_profile).

**Staleness**: a graph holds the addresses of the tensors it read. The cache key holds every
parameter's ``data_ptr`` and the scalar arguments, so a replaced tensor (``load_adapter`` into new
tensors, ``.to()``, a changed scaling) gets a new capture, while in-place updates (optimizer steps,
``copy_``) are read by the next replay, as they should be.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Sequence

import torch

from ..switches import SETTINGS

MAX_SHAPES = 8  # graphs per module (distinct input shapes); further shapes run the kernels directly


def applies(x: torch.Tensor, context: Any) -> bool:
    """The runtime part of the rule in the module docstring, for a module's input ``x`` and the
    model's ``AdapterState`` (None: no decode steps known). Cheap: runs once per module call."""
    return context is not None and context.cached_decode_step() and _graphable(x)


def _graphable(x: torch.Tensor) -> bool:
    """The conditions every decode / serving-step graph shares: switched on, a contiguous CUDA
    tensor, not a DTensor (tensor parallelism: a graph would freeze one rank's collectives'
    buffers), not under torch.compile, not inside another capture."""
    return (SETTINGS.decode_graphs and x.is_cuda and x.is_contiguous() and type(x).__name__ != "DTensor"
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


STEP_BUCKETS = (8, 16, 32, 64)  # padded token counts of the serving steps' graphs (<= DECODE_MAX_TOKENS)


def bucket(n: int) -> int | None:
    """The padded token count of a serving step of ``n`` tokens, or None (too many: no graph)."""
    for b in STEP_BUCKETS:
        if n <= b:
            return b
    return None


def step_applies(x: torch.Tensor, context: Any) -> bool:
    """Whether a mixed serving step may replay padded-bucket graphs here (module docstring):
    the plan says the step consumes its outputs (``graph_step``), CUDA, few tokens, not compiling,
    not inside another capture, not a DTensor."""
    plan = getattr(context, "plan", None)
    return plan is not None and plan.graph_step and bucket(x.shape[0]) is not None and _graphable(x)


class _Captured:
    __slots__ = ("graph", "inputs", "outputs", "pool")

    def __init__(self, graph: Any, inputs: tuple[torch.Tensor, ...], outputs: Any, pool: Any = None) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        self.pool = pool  # keeps the shared memory pool's handle alive as long as this graph


_FAILED = object()  # a capture that raised: this shape runs the kernels directly from now on


class GraphCache:
    """The graphs of one module, one per input shapes, each for the parameters it read: a call
    with the same shapes and other parameters (a replaced tensor, another scalar) replaces that
    shape's entry, so stale graphs are freed and never fill the ``MAX_SHAPES`` places (a serving
    step's stacks are rebuilt when a larger-rank adapter enters them)."""

    def __init__(self, capture: Callable[[Callable, tuple], _Captured] | None = None) -> None:
        self.entries: dict[tuple, Any] = {}  # shapes -> (params key, times seen (int) | _Captured | _FAILED)
        self._capture = capture or _cuda_capture
        self.captures = 0  # how many graphs were captured (tests, diagnostics)

    def run(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], params: Sequence[Any]) -> Any:
        shapes = tuple((t.shape, t.dtype) for t in inputs)
        # address AND shape/dtype: a freed stack's address can be reused by one of another rank
        pkey = tuple((p.data_ptr(), p.shape, p.dtype) if isinstance(p, torch.Tensor) else p for p in params)
        held = self.entries.get(shapes)
        entry = held[1] if held is not None and held[0] == pkey else None
        if entry.__class__ is _Captured:
            for static, x in zip(entry.inputs, inputs):
                static.copy_(x)
            entry.graph.replay()
            return entry.outputs
        if entry is None:
            if held is not None or len(self.entries) < MAX_SHAPES:
                self.entries[shapes] = (pkey, 1)
            return fn(*inputs)
        if entry is _FAILED:
            return fn(*inputs)
        try:  # second sighting of this shape: capture it
            entry = self._capture(fn, inputs)
        except Exception as err:  # noqa: BLE001 - an uncapturable path stays correct, just not graphed
            self.entries[shapes] = (pkey, _FAILED)
            _warn_once(f"moelora decode graphs: a capture failed ({type(err).__name__}: {str(err)[:200]}); "
                       "that module runs its kernels directly")
            return fn(*inputs)
        self.entries[shapes] = (pkey, entry)
        self.captures += 1
        _TOTAL["captures"] += 1
        entry.graph.replay()  # the capture recorded the work; the replay does it
        return entry.outputs


class _Pool:
    """A CUDA-graph memory pool handle shared by the decode graphs of one device. Each graph holds
    it; once the last one is freed, the next capture starts a new pool (the allocator does not
    take an old pool id back after its graphs are gone)."""

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()


_POOLS: dict[int, "weakref.ref[_Pool]"] = {}
_STREAMS: dict[int, torch.cuda.Stream] = {}
_WARNED: set[str] = set()
_TOTAL = {"captures": 0}  # every capture of this process, also of modules since freed (captures_total)


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _pool(index: int) -> _Pool:
    ref = _POOLS.get(index)
    pool = ref() if ref is not None else None
    if pool is None:
        pool = _Pool()
        _POOLS[index] = weakref.ref(pool)
    return pool


def _cuda_capture(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> _Captured:
    """Capture fn(*static_inputs) on a side stream into one memory pool shared by the live decode
    graphs of the device (safe: they replay one after another on one stream, and each keeps its
    outputs alive, so no capture reuses memory another graph still reads)."""
    dev = inputs[0].device
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(dev)
    pool = _pool(index)
    static = tuple(x.clone() for x in inputs)
    stream, main = _STREAMS[index], torch.cuda.current_stream(dev)
    stream.wait_stream(main)  # the static inputs are written on the main stream
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        try:
            graph.capture_begin(pool=pool.handle, capture_error_mode="thread_local")
            try:
                outputs = fn(*static)
            finally:
                graph.capture_end()
        except Exception:
            _reset_generator(index)
            raise
    main.wait_stream(stream)
    return _Captured(graph, static, outputs, pool)


def _reset_generator(index: int) -> None:
    """A capture that fails after ``capture_begin`` registered the default CUDA generator leaves
    that generator in capture mode, and every later random op on the device would fail ("Offset
    increment outside graph capture"). Give it a fresh state with the same seed and offset."""
    try:
        gen = torch.cuda.default_generators[index]
        gen.graphsafe_set_state(gen.clone_state())
    except Exception:  # noqa: BLE001 - older torch: nothing more to do
        pass


_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, GraphCache]" = weakref.WeakKeyDictionary()


def cache_for(module: torch.nn.Module) -> GraphCache:
    """The module's graphs (kept outside the module: no state_dict/deepcopy/pickle side effects)."""
    cache = _CACHES.get(module)
    if cache is None:
        cache = _CACHES[module] = GraphCache()
    return cache


def graphed(module: torch.nn.Module, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
            params: Sequence[Any]) -> Any:
    """``fn(*inputs)`` through ``module``'s decode graph for these input shapes. ``params``: every
    tensor ``fn`` reads besides ``inputs`` and every scalar it depends on (the cache key)."""
    return cache_for(module).run(fn, inputs, params)


def captured_graphs(model: torch.nn.Module) -> int:
    """How many decode graphs ``model``'s modules hold (benchmarks report it with every row)."""
    return sum(_CACHES[m].captures for m in model.modules() if m in _CACHES)


def captures_total() -> int:
    """How many decode graphs this process has captured so far, of any model. A difference of two
    readings counts the captures between them, also of modules freed in between (a site unwrapped
    when its last adapter left), which a difference of ``captured_graphs`` would lose."""
    return _TOTAL["captures"]


def clear_decode_graphs(model: torch.nn.Module | None = None, recurse: bool = True) -> None:
    """Free the decode graphs of ``model``'s modules (all models when None; ``recurse=False``:
    ``model``'s own only)."""
    if model is None:
        _CACHES.clear()
        return
    for m in (model.modules() if recurse else (model,)):
        _CACHES.pop(m, None)
