"""Every touch of transformers' private continuous-batching code by ``moelora.serve``, in one place.

Run and tested with transformers 5.24, and with 5.17 (the GPU machine's; its wheel installed
beside the environment's huggingface-hub 2.4 with the import-time version check off):
``tests/test_serve_engine.py``, ``test_serve_registry.py`` and ``test_serve_memory.py`` pass on both
(``TESTED``). ``tests/test_serve_engine.py::test_cb_private_internals`` fails with a message
naming what moved.

What we rely on (``transformers.generation.continuous_batching``):
- ``ContinuousBatchingManager`` (public) and its ``_generation_step`` (private): one step of the
  background loop, after ``ContinuousBatchProcessor.prepare_next_batch`` packed the batch. We
  override it to add ``adapter_names=<per-token BatchPlan>`` to the model kwargs; the rest is
  ``ContinuousBatchProcessor._generation_step`` unchanged (get_model_kwargs -> compute_batch ->
  retrieve_device_outputs).
- ``ContinuousBatchingIOs.requests_in_batch`` (list of ``FutureRequestState`` with
  ``.state.request_id`` and ``.query_length``, in packing order) and ``.num_q_tokens`` (the packed,
  possibly padded, number of query tokens): the batch layout, set by ``prepare_batch_tensors``.
- ``FutureRequestState.has_new_token``: which requests of the batch get a logits row (in packing
  order: the rows of the scores), and ``ModelRunner._sample(scores, output_ids)``: the sampler of
  one step (argmax, or one multinomial over the whole batch). We replace it on our manager's
  runner with a per-row one (``_RowSampler``): greedy rows argmax as before, sampled rows draw
  from the request's own generator, which CB cannot do (its ``do_sample`` is one flag for the
  manager and its draws depend on the batch; it has per-request temperature/top-k/top-p
  processors, but no per-request seed).
- ``ContinuousBatchingManager.batch_processor`` (set when the loop has made its KV cache): the
  engine waits for it before it frees the memory it set aside for the adapter slots.
- ``OutputRouter.result_handlers`` / ``_lock``: per-request delivery. Its handlers are called
  through ``loop.call_soon_threadsafe``; we register an object whose ``call_soon_threadsafe``
  calls at once (in the generation thread), so no asyncio loop is needed.

Requests carry no metadata in CB, so the adapter of each request is kept in a side table
(request id -> adapter name) owned by ``AdapterCBManager``. CUDA graphs and torch.compile of the
CB step are turned off (``cb_config``) unless the engine serves the base only (``Engine(cuda_graphs=True)``
/ ``compile_level``): moelora's hooks build the plan in Python, which a graph replay does not rerun;
async batching is off (its double-buffered IOs are not read here).
- ``ContinuousBatchProcessor.handle_batch_error`` and ``inputs_and_outputs.requests_in_batch`` /
  ``num_request_in_batch``: a step that raises fails its own requests only (``AdapterCBManager``).
- ``ContinuousBatchingManager._create_batch_processor`` and ``PagedAttentionCache.free_blocks`` with
  its allocators' ``block_table``: ``guard_free_blocks``.
"""
from __future__ import annotations


import logging
import time

import torch

TESTED = {"transformers": ">=5.17,<5.25"}  # 5.24 run, 5.17 read


def _cb():
    from transformers.generation.continuous_batching import continuous_api

    return continuous_api


def cb_config(max_queue_size: int = 0, **overrides):
    """A ``ContinuousBatchingConfig`` the adapter plan is correct under: no prefix/block sharing
    across requests (KV of one prompt differs per adapter), no CUDA graphs, no compile, no async IO."""
    from transformers import ContinuousBatchingConfig

    kw = dict(allow_block_sharing=False, use_async_batching=False, use_cuda_graph=False,
              max_queue_size=max_queue_size)
    kw.update(overrides)
    return ContinuousBatchingConfig(**kw)


class _Immediate:
    """Stands in for the asyncio loop of ``OutputRouter.result_handlers``: calls at once, then
    ``after()`` (the engine's flush: one hand-off per event loop per step, not one per request)."""

    def __init__(self, after=None) -> None:
        self.after = after

    def call_soon_threadsafe(self, fn, *args):
        try:
            fn(*args)
        finally:
            if self.after is not None:
                self.after()


_IMMEDIATE = _Immediate()


def _allocators(cache) -> list:
    """The paged cache's per-group allocators (each with a ``block_table``: request id -> blocks):
    ``cache_allocators`` (a dict) in 5.24, ``group_cache_managers`` (a list) in 5.17."""
    allocs = getattr(cache, "cache_allocators", None)
    if isinstance(allocs, dict):
        return list(allocs.values())
    return list(getattr(cache, "group_cache_managers", None) or [])


def guard_free_blocks(cache) -> None:
    """``cache.free_blocks(request_id)`` only for a request that holds blocks. CB calls it for every
    cancelled request (``Scheduler.clear_cancelled_requests``), also one still waiting (no blocks
    yet) or one that CB finished (blocks freed) before our cancel reached it; in 5.17 each such call
    logs "CacheAllocator 0 attempted to free blocks for non-existent request_id" (5.24: a silent
    no-op). An instance attribute: this cache only."""
    if getattr(cache.free_blocks, "_moelora_guard", False):
        return
    original = cache.free_blocks

    def free_blocks(request_id, *args, **kwargs):
        if not any(request_id in a.block_table for a in _allocators(cache)):
            return None
        return original(request_id, *args, **kwargs)

    free_blocks._moelora_guard = True
    cache.free_blocks = free_blocks


class StepError(RuntimeError):
    """One packed step failed (e.g. CUDA out of memory): its requests fail with this, the engine goes on."""


class _RowSampler:
    """Stands in for ``ModelRunner._sample`` on our runner: ``rows`` (set before each step) holds,
    per logits row, None (greedy: the original sampler's argmax) or the request's
    ``SamplingParams`` (temperature, top_p and its own ``torch.Generator``)."""

    def __init__(self, original) -> None:
        self.original = original
        self.rows: list = []

    def __call__(self, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        if not any(r is not None for r in self.rows):
            return self.original(scores, output_ids)
        logits = scores[0]  # (N, V) float32
        next_tokens = torch.argmax(logits, dim=-1)  # (N,)
        for i, sp in enumerate(self.rows[: logits.shape[0]]):
            if sp is None:
                continue
            row = logits[i] / sp.temperature
            if sp.top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p
                sorted_logits, order = torch.sort(row, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
                drop = cum - torch.softmax(sorted_logits, dim=-1) >= sp.top_p  # keeps the first token always
                row = row.clone()
                row[order[drop]] = float("-inf")
            probs = torch.softmax(row, dim=-1)
            next_tokens[i] = torch.multinomial(probs, 1, generator=sp.generator)[0]
        output_ids[0, : next_tokens.shape[0]].copy_(next_tokens)


def make_manager(model, generation_config, continuous_batching_config, plan_for, step_lock=None, sampling_for=None,
                 flush=None):
    """A ``ContinuousBatchingManager`` whose every step runs with
    ``adapter_names=plan_for(layout, num_q_tokens)`` (``layout`` = [(request id, query tokens), ...]
    in packing order; ``num_q_tokens`` the packed count, padding included; a None plan passes no
    ``adapter_names``), holding ``step_lock`` (a lock, or None) for the step; ``sampling_for(request
    id)`` -> None (greedy) or that request's ``SamplingParams`` (``_RowSampler``); ``flush()``: called
    after every delivery of outputs (``_Immediate``).

    A step that raises (CUDA out of memory, a bad adapter, ...) fails the requests of that step
    only (``ContinuousBatchProcessor.handle_batch_error``: each gets the error, its blocks are freed)
    and the loop goes on; CB itself would end its loop and fail every request, so one step's OOM
    would stop the engine for good (what the first H200 run did)."""
    import contextlib
    api = _cb()

    class AdapterCBManager(api.ContinuousBatchingManager):
        def _create_batch_processor(self):
            bp = super()._create_batch_processor()
            guard_free_blocks(bp.cache)
            return bp

        def _generation_step(self) -> None:
            bp = self.batch_processor
            if bp is None:
                raise RuntimeError("Tried to perform a generation step before the batch processor was initialized.")
            io = bp.inputs_and_outputs
            try:
                self._adapter_step(bp, io)
            except Exception as e:  # noqa: BLE001 - the step's requests get the error, the loop goes on
                self._fail_step(bp, io, e)

        def _adapter_step(self, bp, io) -> None:
            runner = bp.model_runner
            if sampling_for is not None and not isinstance(runner.__dict__.get("_sample"), _RowSampler):
                runner._sample = _RowSampler(runner._sample)  # an instance attribute: this runner only
            t0 = time.perf_counter()
            with step_lock if step_lock is not None else contextlib.nullcontext(), torch.no_grad():
                t1 = time.perf_counter()
                layout = [(fs.state.request_id, fs.query_length) for fs in io.requests_in_batch]
                plan = plan_for(layout, io.num_q_tokens)
                if sampling_for is not None:
                    runner._sample.rows = [sampling_for(fs.state.request_id) for fs in io.requests_in_batch
                                           if fs.has_new_token]
                batch_data = io.get_model_kwargs(use_padding=runner.pad_inputs)
                if plan is not None:
                    batch_data["adapter_names"] = plan
                t2 = time.perf_counter()
                runner.compute_batch(self.model, batch_data)
                t3 = time.perf_counter()
                io.retrieve_device_outputs()
                t4 = time.perf_counter()
            self.step_times.add(t0, t1, t2, t3, t4, len(layout), io.num_q_tokens)

        def _fail_step(self, bp, io, error: Exception) -> None:
            n = len(io.requests_in_batch)
            oom = isinstance(error, torch.OutOfMemoryError)
            err = StepError(f"the packed step of {n} request(s) failed ({type(error).__name__}: {error})"
                            + ("; the engine goes on (lower max_batch_tokens or adapter_memory_gb, or set "
                               "num_blocks, if this repeats)" if oom else "; the engine goes on"))
            if oom:
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
            logging.getLogger("moelora.serve").error("%s", err)
            bp.handle_batch_error(err)  # each request of the step: FAILED with err, delivered, blocks freed
            io.requests_in_batch = []  # update_batch (next in the loop body) has nothing left to update
            io.num_request_in_batch = 0
            if oom:
                torch.cuda.empty_cache()

    manager = AdapterCBManager(model=model, generation_config=generation_config,
                               continuous_batching_config=continuous_batching_config)
    manager._moelora_immediate = _Immediate(flush)
    manager.step_times = StepTimes()
    return manager


class StepTimes:
    """Where a packed step's wall time goes (the last ``keep`` steps), in ms: ``lock`` (waiting
    for the model lock: an adapter swap), ``prep`` (our plan + CB's model kwargs), ``launch`` (the
    forward, sampling included, returning: on CUDA the host's launch time, the step being
    asynchronous), ``sync`` (waiting for the device after that), ``between`` (from the end of one
    step to the start of the next: CB's update of the batch, delivery of the outputs, scheduling
    and the batch tensors of the next). ``summary()``: medians, sums, maxima and the step count, and
    which step had the longest launch (``launch_max_step``: its index, tokens and requests: a
    one-off stall of a long prefill step is a first-time kernel compile, of a decode step a graph
    capture), and ``launch_ms_fit``: the least-squares line launch ms = ``ms_at_0`` +
    ``ms_per_1k_tokens`` * tokens / 1000 over the steps (its slope is what a prefill token costs:
    against the base's, the adapters' share of a long prefill step). ``timeline(origin)``: every
    step kept, from ``origin`` (a ``time.perf_counter()``) on."""

    def __init__(self, keep: int = 4096) -> None:
        import collections

        self.rows = collections.deque(maxlen=keep)
        self._last_end = None

    def add(self, t0, t1, t2, t3, t4, requests, tokens) -> None:
        between = None if self._last_end is None else t0 - self._last_end
        self._last_end = t4
        self.rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, between, requests, tokens, t0))

    def timeline(self, origin: float) -> list[dict]:
        """Each step kept: its start (s after ``origin``), lock/prep/launch/sync ms, requests, tokens."""
        return [{"t_s": round(r[7] - origin, 4), "lock_ms": round(1e3 * r[0], 3), "prep_ms": round(1e3 * r[1], 3),
                 "launch_ms": round(1e3 * r[2], 3), "sync_ms": round(1e3 * r[3], 3), "requests": r[5], "tokens": r[6]}
                for r in self.rows if r[7] >= origin]

    def reset(self) -> None:
        self.rows.clear()
        self._last_end = None

    def summary(self) -> dict:
        import statistics

        rows = list(self.rows)
        out = {"steps_timed": len(rows)}
        for i, k in enumerate(("lock", "prep", "launch", "sync", "between")):
            xs = [r[i] for r in rows if r[i] is not None and (k != "between" or r[i] < 1.0)]  # idle gaps left out
            out[f"{k}_ms_p50"] = round(1e3 * statistics.median(xs), 3) if xs else None
        for i, k in ((0, "lock"), (2, "launch")):  # the sums say whether steps or their waits hold the time
            out[f"{k}_s_sum"] = round(sum(r[i] for r in rows), 3)
            out[f"{k}_ms_max"] = round(1e3 * max((r[i] for r in rows), default=0.0), 3)
        out["steps_s_sum"] = round(sum(r[0] + r[1] + r[2] + r[3] for r in rows), 3)
        if rows:
            i = max(range(len(rows)), key=lambda j: rows[j][2])
            out["launch_max_step"] = {"index": i, "tokens": rows[i][6], "requests": rows[i][5]}
        out["requests_per_step_p50"] = statistics.median([r[5] for r in rows]) if rows else None
        out["tokens_per_step_p50"] = statistics.median([r[6] for r in rows]) if rows else None
        out["launch_ms_fit"] = _line_fit([r[6] for r in rows], [1e3 * r[2] for r in rows])
        return out


def _line_fit(xs: list, ys: list) -> dict | None:
    """Least squares y = a + b x: {"ms_at_0": a, "ms_per_1k_tokens": 1000 b, "steps": n}; None
    without two distinct x."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"ms_at_0": round(my - b * mx, 3), "ms_per_1k_tokens": round(1e3 * b, 3), "steps": n}


def register_handler(manager, request_id: str, callback) -> None:
    """Deliver every output of ``request_id`` to ``callback`` (called in the generation thread)."""
    router = manager.output_router
    with router._lock:
        router.result_handlers[request_id] = (callback, getattr(manager, "_moelora_immediate", _IMMEDIATE))


def drop_handler(manager, request_id: str) -> None:
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


def cache_ready(manager) -> bool:
    """Whether the generation loop has made its batch processor (and so its paged KV cache)."""
    return getattr(manager, "batch_processor", None) is not None


def stop_manager(manager, timeout: float | None = 30.0) -> None:
    """Stop the generation thread (its original attention implementation goes back on the model)."""
    if manager.is_running():
        manager.stop(block=True, timeout=timeout)


def requests_scheduler():
    from transformers.generation.continuous_batching import scheduler

    return scheduler


def check_internals() -> list[str]:
    """What of the above is missing in the installed transformers (empty: all there)."""
    import inspect

    missing = []
    try:
        api = _cb()
        from transformers.generation.continuous_batching import input_outputs
        from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return [f"transformers.generation.continuous_batching: {e}"]
    for cls, names in ((api.ContinuousBatchingManager, ("_generation_step", "add_request", "cancel_request", "start",
                                                        "stop", "output_router", "batch_processor")),
                       (api.ContinuousBatchProcessor, ("_generation_step", "inputs_and_outputs", "model_runner")),
                       (input_outputs.ContinuousBatchingIOs, ("get_model_kwargs", "retrieve_device_outputs",
                                                              "prepare_batch_tensors"))):
        src = inspect.getsource(cls)
        for n in names:
            if not hasattr(cls, n) and f"self.{n}" not in src:
                missing.append(f"{cls.__name__}.{n}")
    src = inspect.getsource(input_outputs.ContinuousBatchingIOs.prepare_batch_tensors)
    for n in ("self.requests_in_batch", "self.num_q_tokens", "query_length", "state.request_id"):
        if n not in src:
            missing.append(f"ContinuousBatchingIOs.prepare_batch_tensors no longer sets/reads {n}")
    from transformers.generation.continuous_batching import model_runner, requests

    if "has_new_token" not in inspect.getsource(requests.FutureRequestState):
        missing.append("FutureRequestState.has_new_token")
    sample_src = inspect.getsource(model_runner.ModelRunner)
    if "def _sample(self, scores" not in sample_src or "self._sample(scores, output_ids)" not in sample_src:
        missing.append("ModelRunner._sample(scores, output_ids) (replaced per row by _RowSampler)")
    if "self.batch_processor = " not in inspect.getsource(api.ContinuousBatchingManager):
        missing.append("ContinuousBatchingManager.batch_processor")
    src = inspect.getsource(api.ContinuousBatchProcessor._generation_step)
    for n in ("get_model_kwargs", "compute_batch", "retrieve_device_outputs"):
        if n not in src:
            missing.append(f"ContinuousBatchProcessor._generation_step no longer calls {n} (update AdapterCBManager)")
    bp_src = inspect.getsource(api.ContinuousBatchProcessor)
    for n in ("def handle_batch_error", "prepare_batch_update()[0]", "finish_request"):
        if n not in bp_src:
            missing.append(f"ContinuousBatchProcessor.handle_batch_error ({n}): a failed step's requests (AdapterCBManager)")
    if "def _create_batch_processor" not in inspect.getsource(api.ContinuousBatchingManager):
        missing.append("ContinuousBatchingManager._create_batch_processor (the free-blocks guard)")
    from transformers.generation.continuous_batching import cache as cache_mod

    cache_src = inspect.getsource(cache_mod.PagedAttentionCache)
    if "def free_blocks" not in cache_src or not ("self.cache_allocators" in cache_src
                                                  or "self.group_cache_managers" in cache_src):
        missing.append("PagedAttentionCache.free_blocks / its allocators (guard_free_blocks)")
    if "self.cache.free_blocks(" not in inspect.getsource(requests_scheduler()):
        missing.append("Scheduler frees cancelled requests through cache.free_blocks (guard_free_blocks)")
    router = api.OutputRouter()
    for n in ("result_handlers", "_lock"):
        if not hasattr(router, n):
            missing.append(f"OutputRouter.{n}")
    if "call_soon_threadsafe" not in inspect.getsource(api.OutputRouter):
        missing.append("OutputRouter no longer delivers through loop.call_soon_threadsafe")
    return missing


