"""``moelora.serve.Engine``: many adapters over one base, on transformers' continuous batching.

    engine = Engine(model, adapters_dir="adapters/", max_resident_adapters=8)
    rid = engine.submit(prompt_ids, adapter="math", max_new_tokens=64, temperature=0.7, seed=1)
    for token in engine.stream(rid): ...               # the new token ids, as they are generated
    engine.cancel(rid); engine.load_adapter("code", path); engine.unload_adapter("code")
    engine.list_adapters(); engine.metrics()          # swaps, host->device bytes, resident set, ...
    engine.close()

The engine is ``transformers``' ``ContinuousBatchingManager`` (paged KV cache, scheduler,
chunked prefill): it packs the tokens of every scheduled request into one flattened sequence.
Requests carry no metadata there, so the engine keeps a side table (request id -> the device
slot of its adapter) and, for every packed batch, gives the forward a per-token ``BatchPlan``
(``BatchPlan.per_token``: each token's adapter slot), which every adapted module reads like any
mixed batch. Everything that touches transformers' private CB code is in ``_cb_private.py``.

Adapters (S-LoRA's split, ``registry.py``): every adapter is known to an ``AdapterRegistry``
(subfolders of ``adapters_dir``, ``load_adapter``, in-memory ``add_adapter_tensors``, and the
model's own adapters, which the engine takes into the registry at start: they leave the model and
``close()`` puts them back); its tensors are read into a host cache on first use and copied into
at most ``max_resident_adapters`` device slots (and ``adapter_memory_gb``), LRU.

Admission (our queue in front of CB, FIFO): a request enters CB only once its adapter is
resident and pinned, and only while the distinct adapters of the requests inside CB stay within
``max_adapters_per_step`` (so no packed step can hold more), of which at most
``max_mixlora_per_step`` MixLoRA adapters (their expert stacks cover only that many positions:
``_stack_positions``); a request that cannot enter waits
(its adapter is prefetched into a free or unpinned slot when one can be had). Later requests may
overtake a waiting one only if they need no new adapter, and at most ``max_bypass`` times; then
admission stops until it gets in, so a cold adapter behind many hot requests is never starved.
A request that waits only for its adapter's swap (done by the admission thread between two
steps, in queue order) is not such a wait: it holds nobody back, and its place under the caps is kept.
Pins are released when a request finishes or is cancelled.

Settings that keep each response equal to ``model.generate`` with its adapter alone: no KV block
sharing between requests (the KV of one prompt differs per adapter), no CUDA graphs or compile of
the CB step (moelora's hooks run per forward). Decoding is greedy unless a request asks for
``temperature`` > 0 (with ``top_p``, ``seed``): then the request's own generator samples its rows
(``_cb_private``), so a seed gives the same text whatever else shares the batch. LoRA-Switch rows
always run unmerged here. While the engine is open it owns the model (its generation thread runs
the forwards): do not call the model from elsewhere until ``close()``.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import types
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..layers import decode_graphs
from ..layers.adapted import AdaptedFFN, AdaptedLinear, stacked_adapter_bytes
from ..state import BatchPlan
from . import _cb_private
from .registry import AdapterRegistry, RegistryError, config_key

log = logging.getLogger(__name__)

_DONE = object()  # sentinel in a request's queue: cancelled or engine closed
DEFAULT_MAX_BATCH_TOKENS = 2048  # tokens per packed step (CB's own default is 8192): bounds one step's activations


def _room(table: list, region: tuple[int, int, bool]) -> int | None:
    """A free position of the stack table within ``region`` = (first, end, may grow): a released
    one, else (may grow) a new one at the end of the table; None when the region is full."""
    lo, hi, grow = region
    for i in range(lo, min(hi, len(table))):
        if table[i] is None:
            return i
    if grow:
        table.append(None)
        return len(table) - 1
    return None


class EngineError(RuntimeError):
    """A request failed inside the engine (its message says why)."""


class UnknownAdapterError(KeyError):
    """The request named an adapter the engine does not serve; ``available`` lists the ones it does."""

    def __init__(self, name, available) -> None:
        super().__init__(f"unknown adapter {name!r}; available: {list(available)}")
        self.name = name
        self.available = list(available)

    def __str__(self) -> str:
        return self.args[0]


class QueueFullError(RuntimeError):
    """More requests in flight than ``max_pending``: try again later."""


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens to generate) does not fit the model's context."""


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded (wrong base model, bad files, ...); nothing of it is served."""


@dataclass
class SamplingParams:
    """Per-request decoding: ``temperature`` 0 = greedy (argmax, exactly ``generate``'s);
    > 0 samples from softmax(logits / temperature) restricted to the smallest set of tokens whose
    probability reaches ``top_p``, with the request's own generator seeded by ``seed`` (None: a
    random seed), so equal seeds give equal tokens whatever else shares the packed batch."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: object = None  # torch.Generator on the model's device, made at admission

    def validate(self) -> "SamplingParams":
        import math

        t, p = float(self.temperature), float(self.top_p)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.temperature, self.top_p = t, p
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class _Request:
    rid: str
    adapter: str | None
    prompt_len: int
    prompt: list = field(default_factory=list)
    max_new_tokens: int = 0
    eos_token_id: object = None
    sampling: SamplingParams | None = None
    out: queue.Queue = field(default_factory=queue.Queue)
    loop: object = None  # an asyncio loop: outputs go to ``aout`` through it (``astream``)
    aout: object = None
    sent: int = 0
    admitted: bool = False  # handed to CB (its adapter pinned)
    finished: bool = False
    bypassed: int = 0  # later requests admitted while this one waited (fairness)
    tokens: list = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    no_slot: bool = False  # an install pass found no slot for its adapter (all pinned): a real wait


class Engine:
    """See the module docstring. ``model``: a Hugging Face causal LM, with or without moelora
    adapters (its adapters are served too); ``adapters_dir``: a folder whose subfolders are
    adapter folders (``moelora.save_adapter``), served under their folder names (config and base
    model checked at start, tensors read on first use).

    ``max_pending``: requests in flight (queued or running) before ``submit`` raises
    ``QueueFullError``; ``context_len``: the longest prompt + generation (default: the model's
    ``max_position_embeddings``); ``eos_token_id``: default stop token(s) (default: the model's);
    ``num_blocks`` / ``max_batch_tokens``: the paged KV cache's size and the most tokens per packed
    step (default 2048, ``DEFAULT_MAX_BATCH_TOKENS``; ``num_blocks`` default: on CPU, enough for
    ``max_pending`` full contexts; on CUDA, the engine's memory plan, below); ``cb_overrides``: more
    ``ContinuousBatchingConfig`` fields.

    ``max_resident_adapters`` / ``adapter_memory_gb``: the device slot pool (None: no limit; on CUDA
    an unset ``adapter_memory_gb`` becomes 10% of the device); ``max_adapters_per_step``: most
    distinct adapters (the base not counted) among the requests inside CB (on CUDA, unset: the
    slot count, at most 16); ``max_mixlora_per_step``: of those, most MixLoRA adapters (None: no
    cap of their own). Set, the stacks keep MixLoRA adapters in positions of their own, and only
    those positions hold E experts' rows: a plain LoRA position then costs its rank only (7B shape,
    8 experts r16: 0.37 GB less per LoRA position), so more adapters per step fit the memory
    plan; ``max_bypass``: FIFO fairness (module docstring);
    ``attn_implementation``: the attention backend set on the model before CB starts (None: the
    model's; CB accepts ``sdpa`` (paged SDPA), ``paged|eager`` and flash implementations; flex
    attention is not a CB backend in transformers 5.17–5.24); ``metrics()['attn_implementation']``
    says which one runs.

    GPU memory (``memory.py``): on CUDA without ``num_blocks`` the engine sizes the KV cache itself
    from the free memory minus the slot pool, one step's activations (``step_memory_gb``, default a
    bound from ``max_batch_tokens`` and the model's dims), a mixed step's adapter stacks
    (``max_adapters_per_step`` positions, + ``max_mixlora_per_step``, of adapters whose plain-LoRA
    tensors are at most ``max_adapter_gb`` and MixLoRA experts and router at most ``max_expert_gb``;
    larger adapters are then refused) and a margin, and passes CB that ``num_blocks``; ``kv_memory_fraction`` caps the cache
    at that share of the free memory; ``memory_plan`` is the result (S-LoRA's unified paging shares
    one pool; here the split is fixed at start). A step that fails (e.g. CUDA out of memory) fails
    its own requests only; the engine goes on.

    ``cuda_graphs`` / ``compile_level``: CB's CUDA graphs / torch.compile of the step
    (``use_cuda_graph``, ``default_compile_level``), off by default and allowed only for an engine
    that serves the base alone: the per-token adapter plan is Python run by moelora's hooks at every
    forward, which a graph replay or compiled step does not rerun. moelora's own graphs of a mixed
    step's adapted modules (``decode_graphs.step_applies``) are captured by ``warmup()``, at start
    (``warmup=True``) for the adapters known then; call it again after registering adapters."""

    def __init__(self, model, adapters_dir: str | os.PathLike | None = None, *, max_pending: int = 64,
                 max_new_tokens: int = 256, context_len: int | None = None, eos_token_id=None,
                 base_name: str = "base", num_blocks: int | None = None, max_batch_tokens: int | None = None,
                 cb_overrides: dict | None = None, max_resident_adapters: int | None = None,
                 adapter_memory_gb: float | None = None, max_adapters_per_step: int | None = None,
                 max_mixlora_per_step: int | None = None, max_bypass: int = 8,
                 attn_implementation: str | None = None, max_adapter_gb: float | None = None,
                 max_expert_gb: float | None = None,
                 step_memory_gb: float | None = None, kv_memory_fraction: float | None = None,
                 cuda_graphs: bool = False, compile_level: int = 0, warmup: bool = True) -> None:
        from transformers import GenerationConfig

        self.model = model.eval()
        self.base_name = base_name
        self.base_only = bool(cuda_graphs) or int(compile_level) > 0
        st0 = model.__dict__.get("moelora_state")
        if self.base_only and (adapters_dir is not None or (st0 is not None and st0.adapters)):
            raise ValueError("cuda_graphs / compile_level serve the base model only (the per-step adapter plan is "
                             "Python that a graph replay or a compiled step would not rerun); drop adapters_dir "
                             "and the model's adapters, or leave cuda_graphs off")
        self.max_pending = max_pending
        self.default_max_new_tokens = max_new_tokens
        if max_adapters_per_step is not None and int(max_adapters_per_step) < 1:
            raise ValueError(f"max_adapters_per_step must be >= 1 (or null), got {max_adapters_per_step}")
        self.max_adapters_per_step = None if max_adapters_per_step is None else int(max_adapters_per_step)
        if max_mixlora_per_step is not None and int(max_mixlora_per_step) < 1:
            raise ValueError(f"max_mixlora_per_step must be >= 1 (or null), got {max_mixlora_per_step}")
        if None not in (max_mixlora_per_step, max_adapters_per_step) and int(max_mixlora_per_step) > int(max_adapters_per_step):
            raise ValueError(f"max_mixlora_per_step ({max_mixlora_per_step}) is a share of max_adapters_per_step "
                             f"({max_adapters_per_step}); lower it or raise max_adapters_per_step")
        if int(max_bypass) < 0:
            raise ValueError(f"max_bypass must be >= 0, got {max_bypass}")
        self.max_bypass = int(max_bypass)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context_len = int(context_len or getattr(cfg, "max_position_embeddings", 2048))
        if eos_token_id is None:
            gc = getattr(model, "generation_config", None)
            eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
            if eos_token_id is None:
                eos_token_id = getattr(cfg, "eos_token_id", None)
        self.eos_token_id = -1 if eos_token_id is None else eos_token_id
        self.load_errors: dict[str, str] = {}
        self._requests: dict[str, _Request] = {}
        self._adapter_of: dict[str, str | None] = {}  # the side table: request id -> device slot name
        self._queue: deque[_Request] = deque()  # waiting for admission, FIFO
        self._inside: dict[str | None, int] = {}  # adapter -> requests admitted to CB and not finished
        self._lock = threading.Lock()  # the request tables
        self._admit_lock = threading.RLock()  # the admission queue and the registry
        # one forward, or one change of the model's adapters, at a time; taken before _admit_lock
        # when both are needed (reentrant: the admission thread holds it around the registry's own use)
        self._model_lock = threading.RLock()
        self._counter = 0
        self._outbox: list = []  # (asyncio queue, item) delivered in the generation thread, not yet handed over
        self._out_lock = threading.Lock()
        self._admitting = False  # _admit is running (re-entered from _finish): run it again after
        self._again = False
        self.warmup_stats: dict = {}  # what the last warmup() did
        self.steps = 0  # packed batches run
        self.mixed_steps = 0  # of which used more than one adapter (base included)
        self.admission_locked_s = 0.0  # host seconds the admission thread held the model lock (swaps)
        self.max_adapters_seen = 0  # most distinct adapters (base not counted) in one packed step
        # seconds from submit to entering CB of the last requests (metrics()["admission_wait_ms"]; clear() to restart)
        self.admission_waits: deque = deque(maxlen=4096)
        self._positions: list = []  # the stacks' slots: model adapter names (None: free), _stack_positions
        self._pos_used: dict = {}  # name -> the step count when a step last used it (LRU of positions)
        self._pos_clock = 0
        self.registry = AdapterRegistry(
            model, max_resident=max_resident_adapters, model_lock=self._model_lock,
            memory_bytes=None if adapter_memory_gb is None else int(float(adapter_memory_gb) * 2**30))
        # the MixLoRA cap lives in the registry, which makes the plans' StackBounds (max_mixlora_per_step)
        self.registry.mixlora_positions = None if max_mixlora_per_step is None else int(max_mixlora_per_step)
        self._absorbed = self._absorb_model_adapters()
        if adapters_dir is not None:
            for sub in sorted(Path(adapters_dir).iterdir()):
                if sub.is_dir() and (sub / "adapter_config.json").exists():
                    try:  # config and base model checked now, tensors read on first use
                        self.load_adapter(sub.name, sub, lazy=True)
                    except AdapterLoadError as e:
                        self.load_errors[sub.name] = str(e)
                        log.error("adapter %s not served: %s", sub.name, e)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id)
        overrides = dict(cb_overrides or {})
        page = overrides.get("block_size", 256)
        max_batch_tokens = int(max_batch_tokens or overrides.pop("max_batch_tokens", None) or DEFAULT_MAX_BATCH_TOKENS)
        self.memory_plan = None
        if model.device.type == "cpu":  # CB sizes its cache from 60% of free memory: minutes of zeroing on a host
            num_blocks = num_blocks or max(16, -(-max_pending * self.context_len // page))
        elif num_blocks is None and "num_blocks" not in overrides:
            # the engine sizes the KV cache itself: CB's own sizing leaves no room for the adapter pool,
            # one step's activations and a mixed step's adapter stacks (moelora/serve/memory.py)
            self.memory_plan = self._plan_memory(max_batch_tokens, page, max_adapter_gb, step_memory_gb,
                                                 kv_memory_fraction, max_expert_gb)
            num_blocks = self.memory_plan.num_blocks
            # CB checks its own footprint against max_memory_percent (0.9) of the free memory; the plan
            # already leaves the pool, the step, the stacks and a margin out, so it checks against all of it
            overrides.setdefault("max_memory_percent", 1.0)
            log.info("memory plan (GiB): %s", self.memory_plan.as_dict())
        if num_blocks is not None:
            overrides.setdefault("num_blocks", int(num_blocks))
        overrides.setdefault("max_batch_tokens", max_batch_tokens)
        if self.base_only:
            overrides.update(use_cuda_graph=bool(cuda_graphs), default_compile_level=int(compile_level))
        self._manager = _cb_private.make_manager(model, gen, _cb_private.cb_config(**overrides),
                                                 self._plan_for, self._model_lock, self._sampling_for,
                                                 flush=self._flush)
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        self._manager.start()
        self._closing = False
        self._wake = threading.Event()
        self._admitter = threading.Thread(target=self._admission_loop, name="moelora-admission", daemon=True)
        self._admitter.start()
        # the cache exists (and CB's free-block guard is in place) before the first request
        wait_until(lambda: _cb_private.cache_ready(self._manager) or not self._manager.is_running(), 600)
        if warmup:
            self.warmup()

    def warmup(self, buckets: tuple[int, ...] | None = None) -> dict:
        """Capture the CUDA graphs of a mixed serving step before requests come (a request
        otherwise waits for them: on the H200, 7B shape, 3-4 s per token bucket, once per bucket).
        Every adapted module runs each bucket of ``decode_graphs.STEP_BUCKETS`` (or ``buckets``)
        twice (a graph is captured at a shape's second sighting) on random inputs, and two prefill
        sizes past the largest bucket once (the eager kernels' first-launch compiles), under a plan
        of the engine's stack positions with one served adapter of each config (LoRA and top-k
        MixLoRA; up to the per-step cap) made resident, so the stacks exist at the sizes and
        addresses later steps write in place (``StackBounds``); then each of those adapters alone
        (a uniform step: its own kernels) at one token and the two prefill sizes, so no kernel
        variant is compiled inside a timed step (tested under the interpreter with
        ``moelora_kernels.launch_keys``). The adapters stay resident, unpinned,
        and a bounded slot pool is then filled with served adapters in their order (``AdapterRegistry.fill``:
        swaps later copy into slots of their config instead of creating modules).
        A no-op (``{"skipped": why}``) where serving-step graphs do not apply (CPU, graphs switched
        off) or no such adapter is served. Returns (and keeps in ``warmup_stats``) what it did."""
        buckets = tuple(buckets or decode_graphs.STEP_BUCKETS)
        t0 = time.perf_counter()
        with self._model_lock, self._admit_lock:
            stats = self._warmup_locked(buckets)
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        self.warmup_stats = stats
        if "skipped" not in stats:
            log.info("warm-up: %d graphs captured in %.1f s (%s)", stats["graphs"], stats["seconds"], stats["adapters"])
        return stats

    def _warmup_locked(self, buckets: tuple[int, ...]) -> dict:
        reg = self.registry
        p = next(self.model.parameters())
        # whether a mixed step's modules would replay graphs here, asked before anything is made resident
        probe = types.SimpleNamespace(plan=BatchPlan.per_token(
            (None,), torch.zeros(buckets[0], dtype=torch.long, device=p.device), graph_step=True))
        if not decode_graphs.step_applies(torch.zeros(buckets[0], 1, device=p.device, dtype=p.dtype), probe):
            return {"skipped": "serving-step graphs do not apply here (CPU, or moelora.decode_graphs(False))"}
        chosen = self._warmup_adapters()
        if not chosen:
            return {"skipped": "no LoRA or top-k MixLoRA adapter is served"}
        slots, pinned = [], []
        try:
            for name in chosen:
                slot = reg.acquire(name, install=True)
                if slot is None:
                    break
                pinned.append(name)
                slots.append(slot)
            st = self._state()
            if st is None or not slots:
                return {"skipped": "no adapter could be made resident"}
            before = decode_graphs.captured_graphs(self.model)
            # then one step each of two prefill sizes past the largest bucket (the eager gathered-LoRA
            # kernels: their first launch compiles them, a 2-3 s stall of the first long prefill
            # otherwise). A launch's compiled variant depends on the step's token count only through
            # its divisibility by 16 (moelora_kernels.gathered_lora; tested there), so a multiple of
            # 16 and one more cover every prefill size.
            prefill = (2 * buckets[-1], 2 * buckets[-1] + 1)
            modules = self._warmup_steps(st, slots, [(b, 2) for b in buckets] + [(b, 1) for b in prefill])
            graphs = decode_graphs.captured_graphs(self.model) - before
            # and each adapter alone (``_plan``'s uniform step: the adapter's own kernels, not the
            # stacks'), one decode-sized step and the two prefill sizes: H100, 7B shape, 1000
            # adapters, without it the first step (one 147-token prefill) compiled six kernels (2.8 s).
            # Decode: the one-launch kernels' variants do not depend on the token count (T is
            # their grid; ``column_groups`` gives a multiple of the block), so one token covers it.
            uniform = (1, *prefill)
            for slot in slots:
                for n in uniform:
                    self._run_modules(st, BatchPlan(slot), (1, n), 1)
            # a warm start of a bounded pool: later swaps copy into these slots (``AdapterRegistry.fill``)
            bounded = reg.max_resident is not None or reg.memory_bytes is not None
            filled = reg.fill(list(reg.adapters)) if bounded else []
            # the stacks as built (every position, at the plan's bounds) against the memory plan's bound
            stack_bytes = stacked_adapter_bytes(self.model)
            if self.memory_plan is not None and stack_bytes > self.memory_plan.stack_bytes:
                log.warning("the adapter stacks take %.3f GiB, more than the memory plan's %.3f GiB (an adapter "
                            "of a smaller rank targets linears the largest one does not): set max_adapter_gb",
                            stack_bytes / 2**30, self.memory_plan.stack_bytes / 2**30)
            return {"graphs": graphs, "buckets": list(buckets), "prefill_tokens": list(prefill),
                    "uniform_tokens": list(uniform), "stack_bytes": stack_bytes,
                    "adapters": chosen[:len(slots)], "modules": modules, "prefilled": len(filled),
                    "resident": len(reg.slots)}
        finally:
            for name in pinned:
                reg.release(name)

    def _warmup_adapters(self) -> list[str]:
        """One served adapter per config (every site its config's stacks cover), LoRA and top-k
        MixLoRA only (the methods the stacks hold), at most the per-step cap."""
        cap = self.max_adapters_per_step or self.registry.max_resident or 16
        mix_cap = self.max_mixlora_per_step
        chosen, keys, mixes = [], set(), 0
        for entry in self.registry.adapters.values():
            if entry.method not in ("lora", "mixlora") or getattr(entry.cfg, "routing_strategy", "topk") != "topk":
                continue
            if entry.method == "mixlora" and mix_cap is not None and mixes >= mix_cap:
                continue
            key = config_key(entry.cfg)
            if key not in keys and len(chosen) < cap:
                keys.add(key)
                chosen.append(entry.name)
                mixes += entry.method == "mixlora"
        return chosen

    def _warmup_steps(self, st, slots: list[str], sizes: list[tuple[int, int]]) -> int:
        """Every adapted module called directly on random inputs of each (tokens, times) in
        ``sizes`` under a serving plan of the engine's stack positions, the tokens spread over
        ``slots``; returns how many modules ran."""
        reg = self.registry
        p = next(self.model.parameters())
        names, pos = self._stack_positions(st, dict.fromkeys(slots))
        idx = [pos[s] for s in slots]
        modules = 0
        for n, times in sizes:
            tok = torch.tensor([idx[i % len(idx)] for i in range(n)], dtype=torch.long, device=p.device)
            plan = BatchPlan.per_token(names, tok, epoch=reg.generation, changes=reg.changes, graph_step=True,
                                       bounds=reg.stack_bounds())
            modules = self._run_modules(st, plan, (n,), times)
        return modules

    def _run_modules(self, st, plan: BatchPlan, lead: tuple[int, ...], times: int) -> int:
        """Call every adapted module ``times`` times on random inputs of leading shape ``lead``
        under ``plan`` (a step's forward, module by module); returns how many modules ran."""
        p = next(self.model.parameters())
        modules = [m for m in self.model.modules() if isinstance(m, (AdaptedLinear, AdaptedFFN))]
        gen = torch.Generator(device=p.device).manual_seed(0)
        with torch.no_grad():
            for _ in range(times):
                st.begin_forward(plan, None, 0)
                try:
                    for m in modules:
                        width = m.in_features if isinstance(m, AdaptedLinear) else m._proj(m._in_roles()[0]).in_features
                        m(torch.randn(*lead, width, device=p.device, dtype=p.dtype, generator=gen))
                finally:
                    st.end_forward()
        return len(modules)

    def _plan_memory(self, max_batch_tokens: int, block_size: int, max_adapter_gb, step_memory_gb, kv_memory_fraction,
                     max_expert_gb=None):
        """The KV cache size on CUDA (``memory.plan_kv_cache``): free memory now, minus the slot pool
        (``adapter_memory_gb``; unset: 10% of the device), one step's activations (``step_memory_gb``
        or the bound of ``memory.step_activation_bytes``), the stacks of a mixed step
        (``max_adapters_per_step`` positions, and ``max_mixlora_per_step`` MixLoRA positions when set,
        each of an adapter's plain-LoRA tensors of at most ``max_adapter_gb`` and MixLoRA experts and
        router of at most ``max_expert_gb``: their defaults are the largest parts known now
        (``registry.part_bytes``), else the pool divided by its slots), and a margin. The registry then
        refuses larger adapters, so the plan holds for every adapter it serves."""
        from . import memory

        dev = self.model.device
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        reg = self.registry
        if reg.memory_bytes is None:
            reg.memory_bytes = int(0.10 * total)
            log.info("adapter_memory_gb unset: the slot pool gets %.2f GiB (10%% of the device)", reg.memory_bytes / 2**30)
        # one stack position's rows per kind of stack (registry.part_bytes): the plain-LoRA tensors
        # (max_adapter_gb) and MixLoRA's experts and router (max_expert_gb); unset, the largest known
        # now (no MixLoRA adapter known: one whose experts are as large as the largest LoRA part)
        known = [(reg.part_bytes(a), a.method) for a in reg.adapters.values()]
        fallback = reg.memory_bytes // (reg.max_resident or 16)
        lora = (int(float(max_adapter_gb) * 2**30) if max_adapter_gb is not None
                else max([p for (p, _), _m in known if p] or [fallback]))
        mix = [e for (_, e), method in known if method == "mixlora" and e]
        expert = int(float(max_expert_gb) * 2**30) if max_expert_gb is not None else max(mix or [lora])
        reg.max_part_bytes = (min(lora, reg.memory_bytes), min(expert, reg.memory_bytes))
        if self.max_adapters_per_step is None:
            self.max_adapters_per_step = min(reg.max_resident or 16, 16)
            log.info("max_adapters_per_step unset: %d (it bounds a mixed step's adapter stacks)",
                     self.max_adapters_per_step)
        if self.max_mixlora_per_step is not None and self.max_mixlora_per_step > self.max_adapters_per_step:
            log.info("max_mixlora_per_step %d lowered to max_adapters_per_step %d", self.max_mixlora_per_step,
                     self.max_adapters_per_step)
            reg.mixlora_positions = self.max_adapters_per_step
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        dims = memory.ModelDims.from_config(cfg, next(self.model.parameters()).element_size())
        top_k = max([getattr(a.cfg, "top_k", 2) or 2 for a in reg.adapters.values()] + [2])
        impl = str(getattr(self.model.config, "_attn_implementation", "") or "")
        return memory.plan_kv_cache(
            free_bytes=free, total_bytes=total, dims=dims, adapter_bytes=reg.memory_bytes,
            max_batch_tokens=max_batch_tokens, block_size=block_size,
            step_bytes=None if step_memory_gb is None else int(float(step_memory_gb) * 2**30),
            stack_bytes=memory.adapter_stack_bytes(reg.max_part_bytes[0], self.max_adapters_per_step,
                                                   reg.max_part_bytes[1], self.max_mixlora_per_step),
            attention_mask="flash" not in impl, top_k=top_k, kv_memory_fraction=kv_memory_fraction)

    # ---- adapters ---------------------------------------------------------------------------
    def _absorb_model_adapters(self) -> list:
        """The model's own adapters go into the registry (host copies) and leave the model, so
        the slot pool bounds what is resident; ``close()`` adds them back."""
        import moelora

        st = self._state()
        if st is None:
            return []
        saved = []
        for name in list(st.adapters):
            info = st.adapters[name]
            tensors = moelora.adapter_state_dict(self.model, name)
            host = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
            saved.append((name, info.config, host, info.trainable, st.active == name))
            self.registry.register_tensors(name, info.config, host)
        moelora.remove_adapter(self.model)
        return saved

    def _state(self):
        return self.model.__dict__.get("moelora_state")

    def adapter_names(self) -> list[str]:
        return list(self.registry.adapters)

    def list_adapters(self) -> list[dict]:
        """One dict per served adapter: name, method, config, resident (in a device slot now)."""
        resident = set(self.registry.resident())
        return [{"name": a.name, "method": a.method, "config": a.cfg.to_dict(), "resident": a.name in resident}
                for a in self.registry.adapters.values()]

    @property
    def max_mixlora_per_step(self) -> int | None:
        """Most MixLoRA adapters inside CB, each in a stack position of its own (None: no cap of their own)."""
        return self.registry.mixlora_positions

    def _is_mixlora(self, name: str) -> bool:
        entry = self.registry.adapters.get(name)
        return entry is not None and entry.method == "mixlora"

    def resolve(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` field picks: None or the base name -> the base model."""
        if name is None or name == self.base_name:
            return None
        if name not in self.registry.adapters:
            raise UnknownAdapterError(name, [self.base_name] + self.adapter_names())
        return name

    def load_adapter(self, name: str, path: str | os.PathLike, lazy: bool = False) -> None:
        """Serve the adapter folder ``path`` as ``name``: config, base model and tensors are read
        and checked now (into the host cache; ``lazy``: the tensors on first use); it is made
        resident on its first request. A wrong base model or bad files raise ``AdapterLoadError``
        and change nothing."""
        if name == self.base_name:
            raise AdapterLoadError(f"{name!r} is the base model's name")
        self._check_adapters_allowed(name)
        with self._admit_lock:
            try:
                self.registry.register_path(name, path, eager=not lazy)
            except RegistryError as e:
                raise AdapterLoadError(f"cannot load adapter {name!r} from {path}: {e}") from e
        self.load_errors.pop(name, None)

    def add_adapter_tensors(self, name: str, cfg, tensors: dict) -> None:
        """Serve an adapter given in memory (``moelora.adapter_state_dict`` keys -> host tensors;
        tensors may share storage with other adapters': benchmarks of 1000 adapters do)."""
        self._check_adapters_allowed(name)
        with self._admit_lock:
            try:
                self.registry.register_tensors(name, cfg, tensors)
            except RegistryError as e:
                raise AdapterLoadError(str(e)) from e

    def _check_adapters_allowed(self, name: str) -> None:
        if getattr(self, "base_only", False):
            raise AdapterLoadError(f"cannot serve adapter {name!r}: this engine runs the CB step with CUDA graphs / "
                                   "compile, so it serves the base model only")

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``; refused (``EngineError``) while requests for it are in flight."""
        self.resolve(name)
        if name is None or name == self.base_name:
            raise EngineError("the base model cannot be unloaded")
        with self._model_lock, self._admit_lock:  # the lock order of the admission thread
            with self._lock:
                busy = sum(1 for r in self._requests.values() if r.adapter == name and not r.finished)
            if busy:
                raise EngineError(f"adapter {name!r} has {busy} request(s) in flight")
            self.registry.unregister(name)

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids, adapter: str | None = None, max_new_tokens: int | None = None,
               eos_token_id=None, loop=None, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> str:
        """Queue a generation of ``prompt_ids`` (a list of token ids) with ``adapter`` (None or
        the base name: the base model); greedy unless ``temperature`` > 0 (``SamplingParams``).
        Returns the request id for ``stream`` (or, given the running asyncio ``loop``, ``astream``)."""
        name = self.resolve(adapter)
        ids = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
        if not ids:
            raise ValueError("the prompt is empty")
        n = self.default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if n < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {n}")
        if len(ids) >= self.context_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the context is {self.context_len}")
        if len(ids) + n > self.context_len:
            raise PromptTooLongError(f"the prompt ({len(ids)} tokens) + max_new_tokens ({n}) exceed the "
                                     f"context of {self.context_len} tokens")
        sampling = SamplingParams(temperature, top_p, seed).validate()
        if not self.healthy():
            raise EngineError(f"the engine stopped: {self.fatal_error()}")
        with self._admit_lock:
            with self._lock:
                pending = sum(1 for r in self._requests.values() if not r.finished)
                if pending >= self.max_pending:
                    raise QueueFullError(f"{pending} requests in flight (max_pending={self.max_pending})")
                rid = f"moelora-{self._counter}"
                self._counter += 1
                req = self._requests[rid] = _Request(
                    rid, name, len(ids), prompt=ids, max_new_tokens=n, sampling=sampling,
                    eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id)
                if loop is not None:
                    import asyncio

                    req.loop, req.aout = loop, asyncio.Queue()
            self._queue.append(req)
            self._admit(install=False)  # at once when no change of the model is needed (no lock waits here)
        self._wake.set()  # the admission thread makes adapters resident (the caller never waits on a step)
        return rid

    # ---- admission (module docstring: FIFO, per-step adapter cap, bounded bypass) ----------------
    def _admit(self, install: bool = True) -> None:
        """One admission round over the queue; ``install=False``: only requests whose adapter is
        resident already (what ``submit`` does inline; a swap waits for the model lock, i.e. for the
        step in flight, so it is left to the admission thread)."""
        with self._admit_lock:
            if self._admitting:  # re-entered (a request failed while entering): the outer call loops again
                self._again = True
                return
            self._admitting = True
            try:
                self._again = True
                while self._again:
                    self._again = False
                    self._admit_pass(install)
            finally:
                self._admitting = False

    def _admission_loop(self) -> None:
        """Admits what it can without the model lock, then swaps adapters in between two steps
        (holding the model lock first, so ``submit`` never waits for a step in flight)."""
        while not self._closing:
            self._wake.wait(0.1)
            self._wake.clear()
            try:
                if self._queue and not self._closing:
                    self._admit(install=False)
                if self._queue and not self._closing:
                    with self._model_lock:
                        t0 = time.perf_counter()
                        try:
                            self._admit(install=True)
                        finally:
                            self.admission_locked_s += time.perf_counter() - t0
            except Exception:  # noqa: BLE001 - keep admitting; a request that failed got its error
                log.exception("admission failed")

    def _admit_pass(self, install: bool) -> None:
        waiting: _Request | None = None  # the oldest request that could not enter
        # install=False: adapters of requests that wait only for a swap (not resident), which the
        # admission thread's install pass makes next, in queue order. That is no wait for the caps
        # or the pool, so those requests hold nobody back (before, the first of them stopped the
        # whole queue after max_bypass overtakes, until the install pass got the model lock: at a
        # saturating rate most of a request's TTFT); their places under the caps are kept.
        swap_next: set = set()
        prefetched = 0
        for req in list(self._queue):
            if req.admitted or req.finished:
                continue
            if req.adapter in swap_next:
                continue  # waits for the same swap
            new_adapter = req.adapter is not None and self._inside.get(req.adapter, 0) == 0
            if waiting is not None and (new_adapter or waiting.bypassed >= self.max_bypass):
                if waiting.bypassed >= self.max_bypass:
                    break  # the waiting one goes first: nothing overtakes it any more
                continue
            distinct = len(swap_next) + sum(1 for a, k in self._inside.items() if a is not None and k > 0)
            ok = not (new_adapter and self.max_adapters_per_step is not None
                      and distinct >= self.max_adapters_per_step)
            if ok and new_adapter and self.max_mixlora_per_step is not None and self._is_mixlora(req.adapter):
                ok = sum(1 for a, k in self._inside.items() if a is not None and k > 0 and self._is_mixlora(a)) + sum(
                    1 for a in swap_next if self._is_mixlora(a)) < self.max_mixlora_per_step
            slot = None
            if ok and req.adapter is not None:
                try:
                    slot = self.registry.acquire(req.adapter, install=install)
                except RegistryError as e:
                    self._fail(req, str(e))
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory making the slot: fail it, never retry forever
                    if isinstance(e, torch.OutOfMemoryError):
                        torch.cuda.empty_cache()
                    self._fail(req, f"adapter {req.adapter!r} could not be made resident ({type(e).__name__}: {e})")
                    continue
                ok = slot is not None
                if not ok and not install and not req.no_slot:
                    swap_next.add(req.adapter)
                    continue
                if not ok and install:
                    req.no_slot = True  # from now on it holds later requests back, as a wait for the caps does
            if not ok:
                if waiting is None:
                    waiting = req
                if install and req.adapter is not None and not prefetched:  # warm the oldest waiting one's slot now
                    prefetched = 1
                    try:
                        self.registry.prefetch(req.adapter)
                    except RegistryError:
                        pass
                continue
            if waiting is not None:
                waiting.bypassed += 1
            self._queue.remove(req)
            self._enter(req, slot)

    def _enter(self, req: _Request, slot: str | None) -> None:
        req.admitted = True
        self.admission_waits.append(time.perf_counter() - req.submitted_at)
        self._inside[req.adapter] = self._inside.get(req.adapter, 0) + 1
        if not req.sampling.greedy:
            seed = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(6), "little")
            req.sampling.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self._adapter_of[req.rid] = slot
        _cb_private.register_handler(self._manager, req.rid, lambda out, req=req: self._deliver(req, out))
        got = self._manager.add_request(req.prompt, request_id=req.rid, max_new_tokens=req.max_new_tokens,
                                        streaming=True, eos_token_id=req.eos_token_id)
        if got is None:
            self._fail(req, "the continuous batching manager refused the request")

    def _fail(self, req: _Request, message: str) -> None:
        self._finish(req)
        self._put(req, _Failed(message))

    def _put(self, req: _Request, item, flush: bool = True) -> None:
        if req.loop is not None:
            with self._out_lock:
                self._outbox.append((req.loop, req.aout, item))
            if flush:
                self._flush()
        else:
            req.out.put(item)

    def _flush(self) -> None:
        """Hand the outputs delivered so far to their asyncio loops: ONE ``call_soon_threadsafe`` per
        loop (CB delivers a step's outputs together, then calls this), not one per request and token:
        each hand-off wakes the loop's thread, which then contends for the GIL with the generation
        thread (every torch op there releases and retakes it)."""
        with self._out_lock:
            items, self._outbox = self._outbox, []
        by_loop: dict = {}
        for loop, aout, item in items:
            by_loop.setdefault(loop, []).append((aout, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    def _deliver(self, req: _Request, out) -> None:  # in the generation thread; CB flushes after the step's outputs
        self._put(req, out, flush=False)
        if out.is_finished():
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        with self._admit_lock:
            with self._lock:
                if req.finished:
                    return
                req.finished = True
                self._adapter_of.pop(req.rid, None)
            if req.admitted:
                self._inside[req.adapter] -= 1
                if req.adapter is not None:
                    self.registry.release(req.adapter)
                _cb_private.drop_handler(self._manager, req.rid)
            elif req in self._queue:
                self._queue.remove(req)
        self._wake.set()  # a pin or a place under the per-step cap may have come free

    def stream(self, rid: str, timeout: float | None = 300.0) -> Iterator[int]:
        """The new token ids of request ``rid`` as they come; ends when it finishes or is
        cancelled; raises ``EngineError`` if it failed."""
        req = self._requests.get(rid)
        if req is None:
            raise KeyError(f"unknown request {rid!r}")
        try:
            while True:
                try:
                    out = req.out.get(timeout=timeout)
                except queue.Empty:
                    raise EngineError(f"request {rid} produced nothing for {timeout} s") from None
                if out is _DONE:
                    return
                yield from self._new_tokens(req, out)
                if out.is_finished():
                    return
        finally:
            if req.finished:
                self._requests.pop(rid, None)

    async def astream(self, rid: str, timeout: float | None = 300.0):
        """``stream`` for asyncio (the request was submitted with ``loop=``): an async iterator
        of lists of new token ids, no thread per request."""
        import asyncio

        req = self._requests.get(rid)
        if req is None or req.aout is None:
            raise KeyError(f"unknown request {rid!r} (or not submitted with loop=)")
        try:
            while True:
                try:
                    out = await asyncio.wait_for(req.aout.get(), timeout)
                except asyncio.TimeoutError:
                    raise EngineError(f"request {rid} produced nothing for {timeout} s") from None
                if out is _DONE:
                    return
                new = self._new_tokens(req, out)
                if new:
                    yield new
                if out.is_finished():
                    return
        finally:
            if req.finished:
                self._requests.pop(rid, None)

    @staticmethod
    def _new_tokens(req: _Request, out) -> list[int]:
        if out.error:
            raise EngineError(f"request {req.rid} failed: {out.error}")
        toks = list(out.generated_tokens)
        new = toks[req.sent:]
        req.sent = len(toks)
        req.tokens = toks
        return new

    def generate(self, prompt_ids, adapter: str | None = None, max_new_tokens: int | None = None, **kw) -> list[int]:
        """``submit`` + collect: the generated token ids."""
        return list(self.stream(self.submit(prompt_ids, adapter, max_new_tokens, **kw)))

    def cancel(self, rid: str) -> None:
        """Stop request ``rid`` (frees its KV blocks and its adapter pin); its stream ends."""
        req = self._requests.get(rid)
        if req is None or req.finished:
            return
        if req.admitted:
            self._manager.cancel_request(rid)
        self._finish(req)
        self._put(req, _DONE)

    def pending(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if not r.finished)

    def queued(self) -> int:
        """Requests waiting for admission (their adapter's slot or a place under the per-step cap)."""
        return len(self._queue)

    def metrics(self) -> dict:
        """Counters for ``/metrics`` and the benchmark: the registry's (swaps, h2d_bytes, resident
        set, ...), steps, mixed steps, the most distinct adapters in one step, queue lengths."""
        with self._admit_lock:
            reg = self.registry.stats()
            inside = {("base" if a is None else a): k for a, k in self._inside.items() if k}
        return {**reg, "steps": self.steps, "mixed_steps": self.mixed_steps,
                "admission_locked_s": round(self.admission_locked_s, 4),
                "admission_wait_ms": _percentiles_ms(self.admission_waits),
                "max_adapters_seen_per_step": self.max_adapters_seen,
                "max_adapters_per_step": self.max_adapters_per_step, "pending": self.pending(),
                "queued": self.queued(), "running": inside, "attn_implementation": self.attn_implementation,
                "warmup": self.warmup_stats,
                "step_times": self._manager.step_times.summary()}

    # ---- called by the generation thread for every packed batch ------------------------------------
    def _plan_for(self, layout, num_q_tokens: int):
        """The step's ``BatchPlan``. A mixed step's ``slot_names`` are the engine's stack positions
        (``_stack_positions``), not the step's adapters in order of appearance: they change only
        when an adapter that holds no position enters a step, so every adapted module's stacked
        tensors (``_stacked_lora`` / ``_moe_stacks``, cached per site for the last composition)
        are reused across steps; each token's index is its adapter's position, the base's the last
        position (None)."""
        self.steps += 1
        st = self._state()
        if st is None:
            return None  # no adapter resident: the plain base
        rows: list = []
        present: dict = {}  # the step's adapters (None: the base), in order
        for rid, q in layout:
            n = self._adapter_of.get(rid)  # a cancelled request still in this batch: the base
            if n is not None and n not in st.adapters:
                n = None
            rows.append((n, q))
            present[n] = None
        if sum(q for _, q in rows) < num_q_tokens:  # padding tokens (static shapes): the base
            present[None] = None
        self.max_adapters_seen = max(self.max_adapters_seen, sum(n is not None for n in present))
        if len(present) == 1:
            only = next(iter(present))
            if only is None or st.adapters[only].method != "lora_switch":
                return BatchPlan(only)  # uniform: the adapter's own fast path
        else:
            self.mixed_steps += 1
        names, pos = self._stack_positions(st, present)
        base = len(names) - 1
        slots: list[int] = []
        for n, q in rows:
            slots.extend([base if n is None else pos[n]] * q)
        slots.extend([base] * (num_q_tokens - len(slots)))
        # the epoch: the registry changes the model's adapters only under the model lock, which this
        # step holds, and takes a new generation each time (the sites check their stacks once per generation);
        # graph_step: CB's paged cache copies keys/values in, so every module's output is consumed in
        # the step and a mixed step of few tokens may replay padded-bucket graphs (decode_graphs)
        # bounds: the stacks are sized for every served adapter, so a newcomer is written in place
        # (the graphs that read them stay valid; ``StackBounds``)
        return BatchPlan.per_token(names, self._slot_index(slots), epoch=self.registry.generation,
                                   changes=self.registry.changes, graph_step=True,
                                   bounds=self.registry.stack_bounds())

    def _stack_positions(self, st, present) -> tuple[tuple, dict]:
        """S-LoRA-style fixed slots for the stacks: a table of positions, each a resident slot's
        model adapter name or free. An adapter keeps its position after its requests leave (a
        later step of it finds its stacks built); a newcomer takes a free position, else, once the
        table holds ``max_adapters_per_step`` (else ``max_resident_adapters``) positions, the least
        recently used one whose adapter has no request inside CB; the other resident slots take
        the room left (so while the resident set holds, the table does too). So the table, and the stacks
        built over it, stay within the memory plan's ``max_adapters_per_step`` + 1 (the base)
        slots. Returns (slot_names: the positions + None for the base, name -> position).
        LoRA-Switch adapters not in this step are left out of its names (their rows take the
        eager path at every site, which would hold back the stacks of all the others).

        With ``max_mixlora_per_step`` = m the table has two regions: positions [0, m) for MixLoRA
        adapters, the rest (``max_adapters_per_step`` of them) for the others; the plans'
        ``StackBounds.mixlora_positions`` = m tells the FFNs that their expert stacks need only
        the first m positions. An adapter never leaves its region."""
        table = self._positions
        cap = self.max_adapters_per_step or self.registry.max_resident
        mix = self.max_mixlora_per_step
        lead = mix or 0
        # the table at its full length from the first mixed step: the stacks keep one shape
        # (and address) whichever adapters come and go, so they are written in place
        full = lead if cap is None else lead + cap
        if len(table) < full:
            table.extend([None] * (full - len(table)))

        def region(n) -> tuple[int, int, bool]:  # (first, end, may grow) of the positions n may take
            if mix is not None and st.adapters[n].method == "mixlora":
                return 0, mix, False
            return lead, len(table), cap is None
        for i, n in enumerate(table):
            if n is not None and n not in st.adapters:  # the slot was dropped
                table[i] = None
        self._pos_clock += 1
        pos = {n: i for i, n in enumerate(table) if n is not None}
        inside = None
        for n in present:
            if n is None:
                continue
            if n not in pos:
                where = region(n)
                i = _room(table, where)
                if i is None:
                    if inside is None:
                        with self._lock:
                            inside = set(self._adapter_of.values())
                    lo, hi, _ = where
                    idle = [j for j in range(lo, hi) if table[j] not in inside and table[j] not in present]
                    if idle:
                        i = min(idle, key=lambda j: self._pos_used.get(table[j], 0))
                        pos.pop(table[i], None)
                    elif mix is not None and st.adapters[n].method == "mixlora":
                        # the MixLoRA region is full of adapters in flight: the admission cap
                        # (max_mixlora_per_step) keeps this from happening
                        raise EngineError(f"no MixLoRA stack position free for {n!r}: {mix} in flight "
                                          "(max_mixlora_per_step)")
                    else:  # cannot happen under the admission cap; grow rather than fail the step
                        i = len(table)
                        table.append(None)
                table[i] = n
                pos[n] = i
            self._pos_used[n] = self._pos_clock
        # the other resident slots too, while there is room (never evicting for them): an adapter
        # admitted later finds its position, and its first step rebuilds nothing
        full_regions = set()
        for n in [s.model_name for s in self.registry.slots if s.adapter is not None]:
            if n in pos or n not in st.adapters:
                continue
            where = region(n)
            i = None if where in full_regions else _room(table, where)
            if i is None:
                full_regions.add(where)
                if len(full_regions) == (1 if mix is None else 2):
                    break
                continue
            table[i] = n
            pos[n] = i
        if len(self._pos_used) > 4 * len(table) + 16:  # forget names that hold no position
            self._pos_used = {n: t for n, t in self._pos_used.items() if n in pos}
        names = tuple(None if n is None or (n not in present and st.adapters[n].method == "lora_switch") else n
                      for n in table) + (None,)
        return names, pos

    def _slot_index(self, slots: list) -> torch.Tensor:
        """The step's per-token positions on the model's device: on CUDA through pinned memory,
        without blocking (a copy from pageable memory waits for the GPU queue)."""
        dev = self.model.device
        t = torch.tensor(slots, dtype=torch.long)
        if dev.type != "cuda":
            return t
        return t.pin_memory().to(dev, non_blocking=True)

    def _sampling_for(self, rid: str):
        req = self._requests.get(rid)
        return None if req is None or req.sampling is None or req.sampling.greedy else req.sampling

    # ---- lifetime ---------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self._manager.is_running() and self.fatal_error() is None

    def fatal_error(self):
        return getattr(getattr(self._manager, "background_thread_status", None), "fatal_error", None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine (requests still in flight end), drop the adapter slots, put the
        model's own adapters and its attention back."""
        import moelora

        with self._lock:
            reqs = [r for r in self._requests.values() if not r.finished]
        for r in reqs:
            self.cancel(r.rid)
        self._closing = True
        self._wake.set()
        self._admitter.join(timeout)
        _cb_private.stop_manager(self._manager, timeout)
        if self._manager.is_running():
            return  # the loop did not stop: leave the model as it is rather than change it under a forward
        with self._model_lock, self._admit_lock:
            self.registry.clear()
            for name, cfg, host, trainable, active in self._absorbed:
                moelora.add_adapter(self.model, name, cfg, trainable=trainable)
                moelora.load_adapter_state_dict(self.model, host, name)
                if active:
                    moelora.set_adapter(self.model, name)
            self._absorbed = []
            self.model.eval()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _hand_over(batch) -> None:  # in the asyncio loop
    for aout, item in batch:
        aout.put_nowait(item)


class _Failed:
    """Put in a request's queue when it fails before CB runs it (e.g. its adapter cannot be made resident)."""

    def __init__(self, message: str) -> None:
        self.error = message
        self.generated_tokens = []

    def is_finished(self) -> bool:
        return True


def _percentiles_ms(seconds) -> dict:
    """p50 / p99 / max in ms and the count of a sample of seconds ({} when empty), with the
    percentile the serving benchmark's TTFT / ITL columns use."""
    from ..bench.timing import percentile

    xs = list(seconds)
    if not xs:
        return {}
    return {"p50": round(1000 * percentile(xs, 0.5), 3), "p99": round(1000 * percentile(xs, 0.99), 3),
            "max": round(1000 * max(xs), 3), "n": len(xs)}


def wait_until(pred, timeout: float = 10.0, every: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()
