"""Every touch of transformers' private continuous-batching code by ``moelora.serve``, in one place.

Run and tested with transformers 5.24; transformers 5.17 (the GPU machine's) only checked by
reading its source: every name below is there, with the same ``_generation_step`` body
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
- ``OutputRouter.result_handlers`` / ``_lock``: per-request delivery. Its handlers are called
  through ``loop.call_soon_threadsafe``; we register an object whose ``call_soon_threadsafe``
  calls at once (in the generation thread), so no asyncio loop is needed.

Requests carry no metadata in CB, so the adapter of each request is kept in a side table
(request id -> adapter name) owned by ``AdapterCBManager``. CUDA graphs and torch.compile of the
CB step are turned off (``cb_config``): moelora's hooks build the plan and forward hooks do not
run during a graph replay; async batching is off (its double-buffered IOs are not read here).
"""
from __future__ import annotations


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
    """Stands in for the asyncio loop of ``OutputRouter.result_handlers``: calls at once."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


_IMMEDIATE = _Immediate()


def make_manager(model, generation_config, continuous_batching_config, plan_for, step_lock=None):
    """A ``ContinuousBatchingManager`` whose every step runs with
    ``adapter_names=plan_for(layout, num_q_tokens)`` (``layout`` = [(request id, query tokens), ...]
    in packing order; ``num_q_tokens`` the packed count, padding included; a None plan passes no
    ``adapter_names``), holding ``step_lock`` (a lock, or None) for the step."""
    import contextlib
    api = _cb()

    class AdapterCBManager(api.ContinuousBatchingManager):
        def _generation_step(self) -> None:
            bp = self.batch_processor
            if bp is None:
                raise RuntimeError("Tried to perform a generation step before the batch processor was initialized.")
            io = bp.inputs_and_outputs
            with step_lock if step_lock is not None else contextlib.nullcontext(), torch.no_grad():
                layout = [(fs.state.request_id, fs.query_length) for fs in io.requests_in_batch]
                plan = plan_for(layout, io.num_q_tokens)
                batch_data = io.get_model_kwargs(use_padding=bp.model_runner.pad_inputs)
                if plan is not None:
                    batch_data["adapter_names"] = plan
                bp.model_runner.compute_batch(self.model, batch_data)
                io.retrieve_device_outputs()

    return AdapterCBManager(model=model, generation_config=generation_config,
                            continuous_batching_config=continuous_batching_config)


def register_handler(manager, request_id: str, callback) -> None:
    """Deliver every output of ``request_id`` to ``callback`` (called in the generation thread)."""
    router = manager.output_router
    with router._lock:
        router.result_handlers[request_id] = (callback, _IMMEDIATE)


def drop_handler(manager, request_id: str) -> None:
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(request_id, None)


def stop_manager(manager, timeout: float | None = 30.0) -> None:
    """Stop the generation thread (its original attention implementation goes back on the model)."""
    if manager.is_running():
        manager.stop(block=True, timeout=timeout)


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
    src = inspect.getsource(api.ContinuousBatchProcessor._generation_step)
    for n in ("get_model_kwargs", "compute_batch", "retrieve_device_outputs"):
        if n not in src:
            missing.append(f"ContinuousBatchProcessor._generation_step no longer calls {n} (update AdapterCBManager)")
    router = api.OutputRouter()
    for n in ("result_handlers", "_lock"):
        if not hasattr(router, n):
            missing.append(f"OutputRouter.{n}")
    if "call_soon_threadsafe" not in inspect.getsource(api.OutputRouter):
        missing.append("OutputRouter no longer delivers through loop.call_soon_threadsafe")
    return missing


