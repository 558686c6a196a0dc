"""An OpenAI-compatible HTTP server over ``moelora.serve.Engine`` (FastAPI + uvicorn).

    moelora-serve model=tiny device=cpu adapters=DIR port=8000

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (``stream: true``: server-sent events),
``/v1/models`` (the base model and every adapter), ``/health``, and vLLM's run-time adapter
endpoints ``/v1/load_lora_adapter`` ({"lora_name", "lora_path"}) and ``/v1/unload_lora_adapter``
({"lora_name"}). The request's ``model`` field picks the adapter: the base model's name, or an
adapter's name (as vLLM and LoRAX do).

Decoding: greedy by default (``temperature`` absent or 0; unlike OpenAI's default of 1, so that a
response without sampling fields is reproducible); ``temperature`` in (0, 2] samples, with
``top_p`` in (0, 1] and ``seed`` (the same seed gives the same text, whatever else the server
runs); ``n`` must be 1. ``/metrics``: the engine's counters (adapter swaps, host->device bytes,
the resident set, queue lengths, the attention backend) as JSON.
Errors are OpenAI-style ``{"error": {"message", "type", "code", ...}}``: unknown model -> 404
(``available`` lists the served names), malformed JSON or bad fields -> 400, prompt + max_tokens
over the context -> 400, more than ``max_pending`` requests in flight -> 429. A client that
disconnects from a stream cancels its request.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal, Union

from .engine import (AdapterLoadError, Engine, EngineError, PromptTooLongError, QueueFullError,
                     UnknownAdapterError)

log = logging.getLogger(__name__)


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        stream: bool = False
        stop: Union[str, list[str], None] = None
        n: int = Field(default=1, ge=1, le=1)
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, gt=0, le=1)
        seed: int | None = Field(default=None, ge=0)
        user: str | None = None

    class CompletionRequest(_Base):
        prompt: Union[str, list[int], list[str], list[list[int]]]
        echo: bool = False

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: Union[str, list[dict[str, Any]], None] = None

    class ChatRequest(_Base):
        messages: list[Message] = Field(min_length=1)

    class LoadRequest(BaseModel):
        lora_name: str = Field(min_length=1)
        lora_path: str = Field(min_length=1)

    class UnloadRequest(BaseModel):
        lora_name: str = Field(min_length=1)

    return CompletionRequest, ChatRequest, LoadRequest, UnloadRequest


def _error(status: int, message: str, type_: str, code: str | None = None, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code, **extra}},
                        status_code=status)


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


class _Stop:
    """Incremental detokenisation with stop strings: ``push(tokens)`` -> (new text, stopped)."""

    def __init__(self, tokenizer, stop) -> None:
        self.tok = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted

    def push(self, ids) -> tuple[str, bool]:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                out = text[self.sent:i] if i >= self.sent else ""
                self.sent = max(self.sent, i)
                return out, True
        # hold back an incomplete multi-byte character and any prefix of a stop string
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        out = text[self.sent:end]
        self.sent = end
        return out, False

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        out = text[self.sent:]
        self.sent = len(text)
        return out


def create_app(engine: Engine, tokenizer, *, close_engine: bool = True):
    """The FastAPI app serving ``engine`` (``tokenizer`` turns text into token ids and back)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from contextlib import asynccontextmanager

    CompletionRequest, ChatRequest, LoadRequest, UnloadRequest = _models()

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="moelora-serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request, exc: RequestValidationError):
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs) or "invalid request"
        return _error(400, msg, "BadRequestError", "invalid_request")

    def _served() -> list[str]:
        return [engine.base_name] + engine.adapter_names()

    def _pick(name: str):
        try:
            return engine.resolve(name), None
        except UnknownAdapterError as e:
            return None, _error(404, f"The model {name!r} does not exist; available: {e.available}",
                                "NotFoundError", "model_not_found", available=e.available)

    def _max_new(req, prompt_len: int, default: int | None):
        n = req.max_completion_tokens or req.max_tokens or default
        if n is None:
            n = max(1, min(engine.default_max_new_tokens, engine.context_len - prompt_len))
        return n

    def _encode(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    def _chat_prompt(messages) -> list[int]:
        msgs = [{"role": m.role, "content": _text_of(m.content)} for m in messages]
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        # no chat template (the tiny demo model): plain "role: content" lines
        return _encode("".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:")

    def _submit(prompt_ids, adapter, n, req):
        try:
            return engine.submit(prompt_ids, adapter, n, loop=asyncio.get_running_loop(),
                                 temperature=req.temperature or 0.0,
                                 top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed), None
        except QueueFullError as e:
            return None, _error(429, str(e), "RateLimitError", "queue_full")
        except PromptTooLongError as e:
            return None, _error(400, str(e), "BadRequestError", "context_length_exceeded")
        except ValueError as e:
            return None, _error(400, str(e), "BadRequestError", "invalid_request")
        except EngineError as e:
            return None, _error(503, str(e), "ServiceUnavailableError", "engine_stopped")

    async def _tokens(rid):
        """The request's new tokens as they come (delivered to this event loop by the engine)."""
        async for chunk in engine.astream(rid):
            for tok in chunk:
                yield tok

    async def _run(rid, stop, max_new):
        """Collect a whole response: (text, completion tokens, finish reason)."""
        st = _Stop(tokenizer, stop)
        text, count, stopped = [], 0, False
        try:
            async for tok in _tokens(rid):
                count += 1
                piece, stopped = st.push([tok])
                text.append(piece)
                if stopped:
                    break
            if not stopped:
                text.append(st.flush())
        finally:
            engine.cancel(rid)
        finish = "stop" if stopped or count < max_new else "length"
        return "".join(text), count, finish

    def _sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def _stream(rid, stop, max_new, make_chunk, prompt_len, first=None):
        async def gen():
            st = _Stop(tokenizer, stop)
            count, stopped = 0, False
            try:
                if first is not None:
                    yield _sse(first)
                async for tok in _tokens(rid):
                    count += 1
                    piece, stopped = st.push([tok])
                    if piece:
                        yield _sse(make_chunk(piece, None))
                    if stopped:
                        break
                if not stopped:
                    tail = st.flush()
                    if tail:
                        yield _sse(make_chunk(tail, None))
                finish = "stop" if stopped or count < max_new else "length"
                yield _sse(make_chunk("", finish, {"prompt_tokens": prompt_len, "completion_tokens": count,
                                                   "total_tokens": prompt_len + count}))
                yield "data: [DONE]\n\n"
            except EngineError as e:
                yield _sse({"error": {"message": str(e), "type": "InternalServerError", "code": "engine_error"}})
            finally:
                engine.cancel(rid)  # a client that disconnects cancels its request (no-op when finished)

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        if not engine.healthy():
            return JSONResponse({"status": "error", "error": str(engine.fatal_error())}, status_code=503)
        m = engine.metrics()
        return {"status": "ok", "pending": m["pending"], "queued": m["queued"], "adapters": len(engine.adapter_names()),
                "resident": m["resident"], "swaps": m["swaps"], "h2d_bytes": m["h2d_bytes"],
                "attn_implementation": m["attn_implementation"]}

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": now, "owned_by": "moelora",
                 "root": engine.base_name, "parent": None}]
        for a in engine.list_adapters():
            data.append({"id": a["name"], "object": "model", "created": now, "owned_by": "moelora",
                         "root": engine.base_name, "parent": engine.base_name, "method": a["method"]})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        adapter, err = _pick(req.model)
        if err:
            return err
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                return _error(400, "one prompt per request (batch prompts are not supported)", "BadRequestError",
                              "invalid_request")
            p = p[0]
        prompt_ids = _encode(p) if isinstance(p, str) else [int(t) for t in p]
        if not prompt_ids:
            return _error(400, "the prompt is empty", "BadRequestError", "invalid_request")
        max_new = _max_new(req, len(prompt_ids), 16)  # OpenAI's default for completions
        rid, err = _submit(prompt_ids, adapter, max_new, req)
        if err:
            return err
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prefix = (p if isinstance(p, str) else tokenizer.decode(prompt_ids, skip_special_tokens=True)) if req.echo else ""

        def chunk(text, finish, usage=None):
            out = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                out["usage"] = usage
            return out

        if req.stream:
            return _stream(rid, req.stop, max_new, chunk, len(prompt_ids),
                           first=chunk(prefix, None) if prefix else None)
        try:
            text, count, finish = await _run(rid, req.stop, max_new)
        except EngineError as e:
            return _error(500, str(e), "InternalServerError", "engine_error")
        return chunk(prefix + text, finish, {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                                             "total_tokens": len(prompt_ids) + count})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        adapter, err = _pick(req.model)
        if err:
            return err
        prompt_ids = _chat_prompt(req.messages)
        max_new = _max_new(req, len(prompt_ids), None)
        rid, err = _submit(prompt_ids, adapter, max_new, req)
        if err:
            return err
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(text, finish, usage=None):
                delta = {"content": text} if text else {}
                out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if usage is not None:
                    out["usage"] = usage
                return out

            first = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}
            return _stream(rid, req.stop, max_new, chunk, len(prompt_ids), first=first)
        try:
            text, count, finish = await _run(rid, req.stop, max_new)
        except EngineError as e:
            return _error(500, str(e), "InternalServerError", "engine_error")
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                          "total_tokens": len(prompt_ids) + count}}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(req: LoadRequest):
        try:
            await asyncio.to_thread(engine.load_adapter, req.lora_name, req.lora_path)
        except AdapterLoadError as e:
            return _error(400, str(e), "BadRequestError", "adapter_load_error")
        return {"status": "ok", "loaded": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(req: UnloadRequest):
        if req.lora_name not in engine.adapter_names():
            return _error(404, f"The adapter {req.lora_name!r} is not loaded; available: {engine.adapter_names()}",
                          "NotFoundError", "model_not_found", available=engine.adapter_names())
        try:
            await asyncio.to_thread(engine.unload_adapter, req.lora_name)
        except EngineError as e:
            return _error(409, str(e), "ConflictError", "adapter_busy")
        return {"status": "ok", "unloaded": req.lora_name}

    return app
