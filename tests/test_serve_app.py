"""moelora-serve end to end: the official ``openai`` client against a uvicorn server on 127.0.0.1
(tiny model, CPU, two adapters from an adapters folder): every response equals offline greedy
``model.generate`` with that adapter alone, also concurrently and streamed; /v1/models, /health;
errors 404 / 400 / 429; run-time load and unload."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import moelora  # noqa: E402

from conftest import make_tiny, randomize_adapter_  # noqa: E402

NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    import hydra

    from moelora.serve.cli import build_server, compose_serve_config

    root = tmp_path_factory.mktemp("serve")
    cfg = compose_serve_config(["model=tiny", "device=cpu", f"adapters={root / 'adapters'}", "max_pending=16",
                                "served_model_name=tiny-base"])
    m, tok = hydra.utils.instantiate(cfg.model)  # the base the server builds
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    randomize_adapter_(m, seed=5)
    for n in ("lora", "mix"):
        moelora.save_adapter(m, root / "adapters" / n, adapter_name=n)
    moelora.save_adapter(m, root / "spare" / "mix", adapter_name="mix")
    other = make_tiny()  # another base model (24 wide): its adapter must not load
    moelora.inject_adapter(other, moelora.LoraConfig(r=4))
    moelora.save_adapter(other, root / "spare" / "otherbase")
    m.eval()

    def offline(text, name, new=NEW):
        ids = tok(text)["input_ids"]
        out = m.generate(torch.tensor([ids]), adapter_names=[name], max_new_tokens=new, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    app, engine = build_server(cfg)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not srv.started and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    assert srv.started
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
    yield {"base": base, "client": client, "offline": offline, "engine": engine, "root": root}
    srv.should_exit = True
    th.join(30)


PROMPTS = ["hello world", "the cat sat", "moelora serves", "abc"]


def test_models_and_health(server):
    c = server["client"]
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny-base", "lora", "mix"]
    with urllib.request.urlopen(server["base"] + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_sampling_fields_and_metrics(server):
    """temperature/top_p/seed on both endpoints: a seed repeats its text; temperature 0 is greedy;
    out-of-range values are 400 naming the field; /metrics counts the adapter swaps."""
    c, offline = server["client"], server["offline"]
    kw = dict(max_tokens=NEW, temperature=1.0, top_p=0.95, seed=5)
    a = c.completions.create(model="mix", prompt=PROMPTS[2], **kw).choices[0].text
    assert c.completions.create(model="mix", prompt=PROMPTS[2], **kw).choices[0].text == a
    assert a != offline(PROMPTS[2], "mix")
    msgs = [{"role": "user", "content": "hi"}]
    ch = [c.chat.completions.create(model="lora", messages=msgs, **kw).choices[0].message.content for _ in range(2)]
    assert ch[0] == ch[1]
    greedy = c.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, seed=9)
    assert greedy.choices[0].text == offline(PROMPTS[0], "lora")
    for field, bad in (("temperature", 3.0), ("top_p", 0.0), ("seed", -1)):
        st, body = _post(server["base"] + "/v1/completions", {"model": "lora", "prompt": "x", field: bad})
        assert st == 400 and field in body["error"]["message"], (field, body)
    with urllib.request.urlopen(server["base"] + "/metrics", timeout=10) as r:
        met = json.loads(r.read())
    assert met["swaps"] >= 2 and met["h2d_bytes"] > 0 and set(met["resident"]) <= {"lora", "mix"}
    assert met["attn_implementation"] and met["pinned"] == {}


def test_completions_equal_offline(server):
    c, offline = server["client"], server["offline"]
    for name in ("tiny-base", "lora", "mix"):
        r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        assert r.choices[0].text == offline(PROMPTS[0], None if name == "tiny-base" else name), name
        assert r.usage.completion_tokens <= NEW


def test_concurrent_clients_equal_offline(server):
    c, offline = server["client"], server["offline"]
    jobs = [(p, n) for p in PROMPTS for n in ("tiny-base", "lora", "mix")]

    def one(job):
        p, n = job
        return c.completions.create(model=n, prompt=p, max_tokens=NEW).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(one, jobs))
    want = [offline(p, None if n == "tiny-base" else n) for p, n in jobs]
    assert got == want


def test_streaming_chat_and_completion(server):
    c, offline = server["client"], server["offline"]
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="mix", prompt=PROMPTS[1],
                                                                     max_tokens=NEW, stream=True))
    assert text == offline(PROMPTS[1], "mix")
    msgs = [{"role": "user", "content": "hi there"}]
    chat_prompt = "user: hi there\nassistant:"  # the tiny tokenizer has no chat template
    r = c.chat.completions.create(model="lora", messages=msgs, max_tokens=NEW)
    assert r.choices[0].message.content == offline(chat_prompt, "lora")
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="lora", messages=msgs, max_tokens=NEW, stream=True) if ch.choices]
    assert "".join(parts) == offline(chat_prompt, "lora")


def test_errors(server):
    c, base = server["client"], server["base"]
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    body = e.value.body
    assert "lora" in json.dumps(body) and "tiny-base" in json.dumps(body)
    status, body = _post(base + "/v1/completions", b"{not json", raw=True)
    assert status == 400 and "error" in body
    status, body = _post(base + "/v1/completions", {"model": "lora", "prompt": "x", "max_tokens": -3})
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = _post(base + "/v1/chat/completions", {"model": "lora"})
    assert status == 400 and "messages" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="lora", prompt="x" * 600, max_tokens=2)  # context: 512
    # still serving after all of these
    assert c.completions.create(model="lora", prompt="abc", max_tokens=3).choices[0].text == \
        server["offline"]("abc", "lora", 3)


def test_queue_full_429(server):
    c, engine = server["client"], server["engine"]
    with engine._model_lock:  # hold the generation loop: requests stay in flight
        rids = [engine.submit([1, 5, 6], "lora", 2) for _ in range(engine.max_pending - engine.pending())]
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="lora", prompt="x", max_tokens=2)
    for r in rids:
        list(engine.stream(r))
    assert c.completions.create(model="mix", prompt="abc", max_tokens=3).choices[0].text == \
        server["offline"]("abc", "mix", 3)


def test_load_unload_at_run_time(server):
    c, base, root = server["client"], server["base"], server["root"]
    status, body = _post(base + "/v1/load_lora_adapter", {"lora_name": "mix2", "lora_path": str(root / "spare" / "mix")})
    assert status == 200, body
    assert "mix2" in [m.id for m in c.models.list().data]
    r = c.completions.create(model="mix2", prompt=PROMPTS[2], max_tokens=NEW)
    assert r.choices[0].text == server["offline"](PROMPTS[2], "mix")
    status, body = _post(base + "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(root / "missing")})
    assert status == 400 and "bad" in body["error"]["message"]
    status, body = _post(base + "/v1/load_lora_adapter", {"lora_name": "ob", "lora_path": str(root / "spare" / "otherbase")})
    assert status == 400 and "ob" in body["error"]["message"], body
    assert "ob" not in [m.id for m in c.models.list().data]
    assert c.completions.create(model="lora", prompt="abc", max_tokens=3).choices[0].text == \
        server["offline"]("abc", "lora", 3)
    status, _ = _post(base + "/v1/unload_lora_adapter", {"lora_name": "mix2"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="mix2", prompt="x", max_tokens=2)


def _sse_lines(resp):
    for raw in resp:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[6:]


def test_client_disconnect_cancels(server):
    engine, base = server["engine"], server["base"]
    body = json.dumps({"model": "lora", "prompt": "abc", "max_tokens": 400, "stream": True}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=30)
    lines = _sse_lines(resp)
    next(lines)
    assert engine.pending() == 1
    resp.close()  # the client goes away mid-stream
    from moelora.serve.engine import wait_until

    assert wait_until(lambda: engine.pending() == 0, timeout=10), "the request was not cancelled"
    assert server["client"].completions.create(model="lora", prompt="abc", max_tokens=3).choices[0].text == \
        server["offline"]("abc", "lora", 3)


def test_cli_subprocess_and_sigterm_drains(tmp_path):
    """``moelora-serve model=tiny device=cpu adapters=DIR port=N`` as a process; SIGTERM lets the
    stream in flight finish, then the process exits."""
    import os
    import signal
    import subprocess
    import sys

    m, _ = __import__("hydra").utils.instantiate(
        __import__("moelora.serve.cli", fromlist=["x"]).compose_serve_config(["model=tiny"]).model)
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="a1")
    moelora.save_adapter(m, tmp_path / "adapters" / "a1")
    port = _free_port()
    env = dict(os.environ, MOELORA_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.Popen([sys.executable, "-m", "moelora.serve.cli", "model=tiny", "device=cpu",
                             f"adapters={tmp_path / 'adapters'}", f"port={port}"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() - t0 < 60, "the server did not start"
            time.sleep(0.2)
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as r:
            assert [d["id"] for d in json.loads(r.read())["data"]] == ["tiny_llama", "a1"]
        body = json.dumps({"model": "a1", "prompt": "abc", "max_tokens": 300, "stream": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            lines = _sse_lines(resp)
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["usage"]["completion_tokens"] == 300
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_stop_strings(server):
    c, offline = server["client"], server["offline"]
    full = offline(PROMPTS[3], "mix")
    stop = full[4:6]
    want = full[:full.find(stop)]
    r = c.completions.create(model="mix", prompt=PROMPTS[3], max_tokens=NEW, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="mix", prompt=PROMPTS[3], max_tokens=NEW,
                                                                     stop=stop, stream=True))
    assert text == want
