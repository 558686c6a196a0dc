"""``moelora.serve.Engine``: many adapters over one base, on transformers' continuous batching.

    engine = Engine(model, adapters_dir="adapters/")   # every subfolder: an adapter under its name
    rid = engine.submit(prompt_ids, adapter="math", max_new_tokens=64)
    for token in engine.stream(rid): ...               # the new token ids, as they are generated
    engine.cancel(rid); engine.load_adapter("code", path); engine.unload_adapter("code")
    engine.list_adapters()                            # [{'name', 'method', ...}, ...]
    engine.close()

The engine is ``transformers``' ``ContinuousBatchingManager`` (paged KV cache, scheduler,
chunked prefill): it packs the tokens of every scheduled request into one flattened sequence.
Requests carry no metadata there, so the engine keeps a side table (request id -> adapter name)
and, for every packed batch, gives the forward a per-token ``BatchPlan``
(``BatchPlan.per_token``: each token's adapter slot), which every adapted module reads like any
mixed batch. Everything that touches transformers' private CB code is in ``_cb_private.py``.

Settings that keep each response equal to ``model.generate`` with its adapter alone: no KV block
sharing between requests (the KV of one prompt differs per adapter), no CUDA graphs or compile of
the CB step (moelora's hooks run per forward), greedy decoding. LoRA-Switch rows always run
unmerged here. While the engine is open it owns the model (its generation thread runs the
forwards): do not call the model from elsewhere until ``close()``. Not done: the GPU slot pool / host cache / paging of adapters (all adapters live in
the model), an adapter-aware scheduler, sampling parameters per request.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..state import BatchPlan
from . import _cb_private

log = logging.getLogger(__name__)

_DONE = object()  # sentinel in a request's queue: cancelled or engine closed


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
class _Request:
    rid: str
    adapter: str | None
    prompt_len: int
    out: queue.Queue = field(default_factory=queue.Queue)
    loop: object = None  # an asyncio loop: outputs go to ``aout`` through it (``astream``)
    aout: object = None
    sent: int = 0
    finished: bool = False
    tokens: list = field(default_factory=list)


class Engine:
    """See the module docstring. ``model``: a Hugging Face causal LM, with or without moelora
    adapters (its adapters are served too); ``adapters_dir``: a folder whose subfolders are
    adapter folders (``moelora.save_adapter``), loaded at start under their folder names.

    ``max_pending``: requests in flight (queued or running) before ``submit`` raises
    ``QueueFullError``; ``context_len``: the longest prompt + generation (default: the model's
    ``max_position_embeddings``); ``eos_token_id``: default stop token(s) (default: the model's);
    ``num_blocks`` / ``max_batch_tokens``: the paged KV cache's size and the most tokens per packed
    batch (default: on CPU, enough for ``max_pending`` full contexts and 2048; on GPU, CB's own
    sizing from free memory); ``cb_overrides``: more ``ContinuousBatchingConfig`` fields."""

    def __init__(self, model, adapters_dir: str | os.PathLike | None = None, *, max_pending: int = 64,
                 max_new_tokens: int = 256, context_len: int | None = None, eos_token_id=None,
                 base_name: str = "base", num_blocks: int | None = None, max_batch_tokens: int | None = None,
                 cb_overrides: dict | None = None) -> None:
        from transformers import GenerationConfig

        self.model = model.eval()
        self.base_name = base_name
        self.max_pending = max_pending
        self.default_max_new_tokens = max_new_tokens
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
        self._adapter_of: dict[str, str | None] = {}  # the side table: request id -> adapter name
        self._lock = threading.Lock()  # the request tables
        self._model_lock = threading.Lock()  # one forward, or one adapter load/unload, at a time
        self._counter = 0
        self.steps = 0  # packed batches run
        self.mixed_steps = 0  # of which used more than one adapter (base included)
        if adapters_dir is not None:
            for sub in sorted(Path(adapters_dir).iterdir()):
                if sub.is_dir() and (sub / "adapter_config.json").exists():
                    try:
                        self.load_adapter(sub.name, sub)
                    except AdapterLoadError as e:
                        self.load_errors[sub.name] = str(e)
                        log.error("adapter %s not served: %s", sub.name, e)
        gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id)
        overrides = dict(cb_overrides or {})
        if model.device.type == "cpu":  # CB sizes its cache from 60% of free memory: minutes of zeroing on a host
            page = overrides.get("page_size", 256)
            num_blocks = num_blocks or max(16, -(-max_pending * self.context_len // page))
            max_batch_tokens = max_batch_tokens or 2048
        if num_blocks is not None:
            overrides.setdefault("num_blocks", int(num_blocks))
        if max_batch_tokens is not None:
            overrides.setdefault("max_batch_tokens", int(max_batch_tokens))
        self._manager = _cb_private.make_manager(model, gen, _cb_private.cb_config(**overrides),
                                                 self._plan_for, self._model_lock)
        self._manager.start()

    # ---- adapters ---------------------------------------------------------------------------
    def _state(self):
        return self.model.__dict__.get("moelora_state")

    def adapter_names(self) -> list[str]:
        st = self._state()
        return [] if st is None else list(st.adapters)

    def list_adapters(self) -> list[dict]:
        """One dict per served adapter: name, method, config (moelora.list_adapters' fields)."""
        import moelora

        return [{"name": a["name"], "method": a["method"], "config": a["config"]} for a in moelora.list_adapters(self.model)]

    def resolve(self, name: str | None) -> str | None:
        """The adapter a request's ``model`` field picks: None or the base name -> the base model."""
        if name is None or name == self.base_name:
            return None
        if name not in self.adapter_names():
            raise UnknownAdapterError(name, [self.base_name] + self.adapter_names())
        return name

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load the adapter folder ``path`` as ``name`` (frozen). A wrong base model or bad files
        raise ``AdapterLoadError`` and change nothing; requests in flight keep running."""
        import moelora

        if name == self.base_name:
            raise AdapterLoadError(f"{name!r} is the base model's name")
        if name in self.adapter_names():
            raise AdapterLoadError(f"adapter {name!r} is already loaded (unload it first)")
        with self._model_lock:
            try:
                moelora.load_adapter(self.model, path, adapter_name=name, trainable=False)
            except Exception as e:  # noqa: BLE001 - every load failure is the same answer to a client
                raise AdapterLoadError(f"cannot load adapter {name!r} from {path}: {e}") from e
            self.model.eval()
        self.load_errors.pop(name, None)

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``; refused (``EngineError``) while requests for it are in flight."""
        import moelora

        self.resolve(name)
        if name is None or name == self.base_name:
            raise EngineError("the base model cannot be unloaded")
        with self._lock:
            busy = sum(1 for r in self._requests.values() if r.adapter == name and not r.finished)
            if busy:
                raise EngineError(f"adapter {name!r} has {busy} request(s) in flight")
            with self._model_lock:
                moelora.delete_adapter(self.model, name)

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids, adapter: str | None = None, max_new_tokens: int | None = None,
               eos_token_id=None, loop=None) -> str:
        """Queue a greedy generation of ``prompt_ids`` (a list of token ids) with ``adapter``
        (None or the base name: the base model); returns the request id for ``stream``
        (or, given the running asyncio ``loop``, for ``astream``)."""
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
        if not self.healthy():
            raise EngineError(f"the engine stopped: {self.fatal_error()}")
        with self._lock:
            pending = sum(1 for r in self._requests.values() if not r.finished)
            if pending >= self.max_pending:
                raise QueueFullError(f"{pending} requests in flight (max_pending={self.max_pending})")
            rid = f"moelora-{self._counter}"
            self._counter += 1
            req = self._requests[rid] = _Request(rid, name, len(ids))
            if loop is not None:
                import asyncio

                req.loop, req.aout = loop, asyncio.Queue()
            self._adapter_of[rid] = name
        _cb_private.register_handler(self._manager, rid, lambda out, req=req: self._deliver(req, out))
        got = self._manager.add_request(ids, request_id=rid, max_new_tokens=n, streaming=True,
                                        eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id)
        if got is None:
            self._finish(req)
            raise EngineError("the continuous batching manager refused the request")
        return rid

    def _put(self, req: _Request, item) -> None:
        if req.loop is not None:
            try:
                req.loop.call_soon_threadsafe(req.aout.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass
        else:
            req.out.put(item)

    def _deliver(self, req: _Request, out) -> None:  # in the generation thread
        self._put(req, out)
        if out.is_finished():
            self._finish(req, keep=True)

    def _finish(self, req: _Request, keep: bool = False) -> None:
        with self._lock:
            req.finished = True
            self._adapter_of.pop(req.rid, None)
        _cb_private.drop_handler(self._manager, req.rid)

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
        """Stop request ``rid`` (frees its KV blocks); its stream ends."""
        req = self._requests.get(rid)
        if req is None or req.finished:
            return
        self._manager.cancel_request(rid)
        self._finish(req)
        self._put(req, _DONE)

    def pending(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if not r.finished)

    # ---- the per-token plan (called by the generation thread for every packed batch) ----------
    def _plan_for(self, layout, num_q_tokens: int):
        if self._state() is None:
            return None  # no moelora adapters on the model: the plain base
        names: list = []
        slots: list[int] = []
        for rid, q in layout:
            n = self._adapter_of.get(rid)  # a cancelled request still in this batch: the base
            if n is not None and n not in self._state().adapters:
                n = None
            if n not in names:
                names.append(n)
            slots.extend([names.index(n)] * q)
        if len(slots) < num_q_tokens:  # padding tokens (static shapes): the base
            if None not in names:
                names.append(None)
            slots.extend([names.index(None)] * (num_q_tokens - len(slots)))
        self.steps += 1
        st = self._state()
        if len(names) == 1 and (names[0] is None or st.adapters[names[0]].method != "lora_switch"):
            return BatchPlan(names[0])  # uniform: the adapter's own fast path
        if len(names) > 1:
            self.mixed_steps += 1
        return BatchPlan.per_token(names, torch.tensor(slots, dtype=torch.long, device=self.model.device))

    # ---- lifetime ---------------------------------------------------------------------------
    def healthy(self) -> bool:
        return self._manager.is_running() and self.fatal_error() is None

    def fatal_error(self):
        return getattr(getattr(self._manager, "background_thread_status", None), "fatal_error", None)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine (requests still in flight end) and put the model's attention back."""
        with self._lock:
            reqs = [r for r in self._requests.values() if not r.finished]
        for r in reqs:
            self.cancel(r.rid)
        _cb_private.stop_manager(self._manager, timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until(pred, timeout: float = 10.0, every: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(every)
    return pred()
