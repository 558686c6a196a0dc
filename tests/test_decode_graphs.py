"""Eager-decode CUDA graphs (moelora.layers.decode_graphs): the cache's bookkeeping on CPU with a
stand-in capture that replays by calling the function, and the real graphs on CUDA."""
import pytest
import torch
from torch.utils._pytree import tree_flatten

import moelora
from moelora.layers import decode_graphs
from moelora.state import AdapterState
from moelora import switch_state
from conftest import make_tiny, randomize_adapter_


class _FakeGraph:
    """Replays like a CUDA graph: recomputes fn on the static inputs into the static outputs."""

    def __init__(self, fn, static, outputs):
        self.fn, self.static, self.outputs, self.replays = fn, static, outputs, 0

    def replay(self):
        self.replays += 1
        for o, n in zip(tree_flatten(self.outputs)[0], tree_flatten(self.fn(*self.static))[0]):
            if isinstance(o, torch.Tensor):
                o.copy_(n)


def _fake_capture(fn, inputs):
    static = tuple(x.clone() for x in inputs)
    outputs = fn(*static)
    return decode_graphs._Captured(_FakeGraph(fn, static, outputs), static, outputs)


def _cache():
    return decode_graphs.GraphCache(capture=_fake_capture)


def test_second_sighting_captures_and_replays_read_new_inputs():
    w = torch.randn(5, 3)
    calls = []

    def fn(x):
        calls.append(1)
        return x @ w.t()

    cache = _cache()
    xs = [torch.randn(2, 3) for _ in range(4)]
    outs = [cache.run(fn, (x,), (w,)) for x in xs]
    assert cache.captures == 1
    for x, o in zip(xs, outs):
        if o is outs[-1]:  # static output: holds the LAST replay's values
            continue
        torch.testing.assert_close(o, x @ w.t())
    assert outs[1] is outs[2] is outs[3], "replays return the graph's static output"
    torch.testing.assert_close(outs[3], xs[3] @ w.t())
    entry = next(e for _, e in cache.entries.values() if isinstance(e, decode_graphs._Captured))
    assert entry.graph.replays == 3  # the capture's own replay + 2


def test_a_replaced_tensor_or_changed_scalar_never_replays_a_stale_graph():
    w, x = torch.randn(4, 3), torch.randn(1, 3)
    cache = _cache()
    for _ in range(3):
        cache.run(lambda v: v @ w.t(), (x,), (w, 2.0))
    w2 = torch.randn(4, 3)  # a new tensor (e.g. load_adapter into new parameters)
    out = cache.run(lambda v: v @ w2.t(), (x,), (w2, 2.0))
    torch.testing.assert_close(out, x @ w2.t())
    out = cache.run(lambda v: 3.0 * (v @ w2.t()), (x,), (w2, 3.0))
    torch.testing.assert_close(out, 3.0 * (x @ w2.t()))
    assert cache.captures == 1  # the new keys were seen once each: not captured yet


def test_a_tensor_of_another_shape_at_the_same_address_never_replays_a_stale_graph():
    """A freed stack's memory can be handed to a stack of another rank: same ``data_ptr``,
    other shape. The key holds the shape, so that is a new entry, not the old graph's replay."""
    buf, x = torch.randn(12), torch.randn(1, 3)
    cache = _cache()
    w = buf.view(4, 3)
    for _ in range(3):
        cache.run(lambda v: v @ w.t(), (x,), (w,))
    w2 = buf[:6].view(2, 3)  # the same address, another shape
    assert w2.data_ptr() == w.data_ptr()
    torch.testing.assert_close(cache.run(lambda v: v @ w2.t(), (x,), (w2,)), x @ w2.t())
    assert cache.captures == 1


def test_captures_total_keeps_the_captures_of_freed_modules():
    """The serving benchmark counts a run's captures as a difference of ``captures_total``: a
    module freed in between (a site unwrapped) keeps its captures in it."""
    w, x = torch.randn(4, 3), torch.randn(1, 3)
    mod = torch.nn.Linear(3, 4)
    before = decode_graphs.captures_total()
    cache = decode_graphs.cache_for(mod)
    cache._capture = _fake_capture
    for _ in range(3):
        cache.run(lambda v: v @ w.t(), (x,), (w,))
    assert decode_graphs.captured_graphs(mod) == 1
    del mod, cache
    assert decode_graphs.captures_total() - before == 1


def test_a_replaced_tensor_frees_the_old_graph_and_takes_no_new_place():
    """Stale graphs do not pile up: a serving step's stacks are rebuilt (new tensors, same
    shapes) when a larger-rank adapter enters them; each time, that shape's graph is replaced,
    so the module keeps graphing after more rebuilds than ``MAX_SHAPES``."""
    x = torch.randn(2, 3)
    cache = _cache()
    for k in range(decode_graphs.MAX_SHAPES + 2):
        w = torch.randn(4, 3)
        for _ in range(3):
            out = cache.run(lambda v: v @ w.t(), (x,), (w,))
        torch.testing.assert_close(out, x @ w.t())
        assert len(cache.entries) == 1
        assert cache.captures == k + 1  # every new tensor captured again on its second sighting


def test_in_place_parameter_updates_are_seen_by_replays():
    w, x = torch.randn(4, 3), torch.randn(1, 3)
    cache = _cache()
    for _ in range(3):
        cache.run(lambda v: v @ w.t(), (x,), (w,))
    w.mul_(-2.0)  # optimizer step / copy_: same address
    torch.testing.assert_close(cache.run(lambda v: v @ w.t(), (x,), (w,)), x @ w.t())


def test_shape_limit_and_failed_capture_fall_back_to_direct_calls():
    cache = _cache()
    for n in range(decode_graphs.MAX_SHAPES + 3):
        x = torch.randn(n + 1, 2)
        torch.testing.assert_close(cache.run(lambda v: v * 2, (x,), ()), x * 2)
    assert len(cache.entries) == decode_graphs.MAX_SHAPES

    def broken(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    cache = decode_graphs.GraphCache(capture=broken)
    x = torch.randn(2, 2)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(4):
            torch.testing.assert_close(cache.run(lambda v: v + 1, (x,), ()), x + 1)
    assert cache.captures == 0 and [e for _, e in cache.entries.values()] == [decode_graphs._FAILED]


def test_graphs_never_apply_on_cpu_or_when_disabled():
    x = torch.randn(1, 4)
    ctx = AdapterState(past_tokens=3)
    assert not decode_graphs.applies(x, ctx)  # CPU
    assert not decode_graphs.applies(x, None)
    with moelora.decode_graphs(False):
        assert not moelora.switches.decode_graphs_enabled()
    assert moelora.switches.decode_graphs_enabled()  # restored after the block


def test_decode_steps_are_told_by_the_dynamic_cache():
    from transformers import DynamicCache

    from moelora._private import cached_tokens

    assert cached_tokens({}) == 0
    cache = DynamicCache()
    assert cached_tokens({"past_key_values": cache}) == 0  # the first forward (prefill, or a one-token prompt)
    k = torch.randn(2, 2, 3, 4)
    cache.update(k, k.clone(), 0)
    assert cached_tokens({"past_key_values": cache}) == 3
    assert cached_tokens({"cache": cache}) == 3
    assert cached_tokens({"past_key_values": object()}) == 0  # a static or unknown cache: no graphs
    ctx = AdapterState()
    assert not ctx.cached_decode_step()
    ctx.past_tokens = 3
    assert ctx.cached_decode_step()


def test_token_mask_is_computed_once_per_forward():
    ctx = AdapterState(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    m = ctx.token_mask_for(2, 1)
    assert m is ctx.token_mask_for(2, 1) and m.tolist() == [True, True]
    ctx.attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert ctx.token_mask_for(2, 1).tolist() == [False, True]


def test_token_mask_follows_an_attention_mask_updated_in_place(tiny_llama):
    moelora.inject_adapter(tiny_llama, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    ids, mask = torch.randint(0, 61, (2, 3)), torch.ones(2, 3, dtype=torch.long)
    tiny_llama(ids, attention_mask=mask)
    mask[0, -1] = 0  # same tensor object, new contents: the next forward must see them
    tiny_llama(ids, attention_mask=mask)
    assert moelora.routing_records(tiny_llama)[0][2].tolist() == [True, True, False, True, True, True]


def test_routing_records_are_copies(tiny_llama):
    moelora.inject_adapter(tiny_llama, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    tiny_llama(torch.randint(0, 61, (1, 5)))
    rec = moelora.routing_records(tiny_llama)
    live = tiny_llama.moelora_state.records["default"][0].routing.experts
    assert rec[0][0].data_ptr() != live.data_ptr() and torch.equal(rec[0][0], live)


# ---- real CUDA graphs ------------------------------------------------------------------------
_CFGS = {
    "lora": lambda: moelora.LoraConfig(r=16, lora_dropout=0.0),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0),
    "lora_switch": lambda: moelora.LoraSwitchConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0,
                                                    switch_mode="unmerged"),
    "lora_switch_merge": lambda: moelora.LoraSwitchConfig(num_experts=8, top_k=2, r=16, lora_dropout=0.0,
                                                          switch_mode="merge"),
}


def _gpu_model(method, dtype):
    model = make_tiny("llama", hidden=256, inter=688, layers=2, heads=8, kv_heads=4).to("cuda", dtype)
    moelora.inject_adapter(model, _CFGS[method]())
    randomize_adapter_(model, scale=0.05)
    return model


def _generate(model, ids, n=10):
    with torch.no_grad():
        r = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return r.sequences, torch.stack(r.logits).float()


def _captures(model):
    return sum(decode_graphs.cache_for(m).captures for m in model.modules() if m in decode_graphs._CACHES)


def _skip_without_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _assert_same_generation(got, ref, dtype):
    """fp32: the same tokens and logits to 1e-4. bf16: the split (graph) and one-launch forms of
    the adapter kernels sum in another order, and a random tiny model has near-tied logits, so
    compare the steps up to and including the first differing token (same prefix there)."""
    if dtype == torch.float32:
        assert torch.equal(got[0], ref[0])
        assert ((got[1] - ref[1]).norm() / ref[1].norm()) < 1e-4
        return
    differ = (got[0] != ref[0]).any(0).nonzero()
    n = int(differ[0]) - (got[0].shape[1] - got[1].shape[0]) + 1 if len(differ) else got[1].shape[0]
    a, b = got[1][:n], ref[1][:n]
    assert ((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("method,batch", [("lora", 1), ("mixlora", 1), ("mixlora", 4), ("lora_switch", 3),
                                          ("lora_switch_merge", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_generate_equals_ungraphed(method, batch, dtype):
    _skip_without_cuda()
    model = _gpu_model(method, dtype)
    ids = torch.randint(4, 61, (batch, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with moelora.decode_graphs(False):
        ref = _generate(model, ids)
    got = _generate(model, ids)
    if method == "lora_switch_merge":  # merged decode runs plain F.linear: nothing to graph
        assert switch_state(model).merge_launches > 0 and _captures(model) == 0
    else:
        assert _captures(model) > 0, "no decode graph was captured"
    _assert_same_generation(got, ref, dtype)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
def test_graphs_follow_in_place_and_replaced_adapter_weights():
    _skip_without_cuda()
    model = _gpu_model("mixlora", torch.float32)
    ids = torch.randint(4, 61, (1, 7), device="cuda")
    _generate(model, ids)  # captures
    randomize_adapter_(model, seed=5, scale=0.05)  # in place: same addresses
    lin = model.model.layers[0].self_attn.q_proj
    lin.adapters["default"].lora_B = torch.nn.Parameter(torch.randn_like(lin.lora_B) * 0.05)  # replaced: a new address
    got = _generate(model, ids)
    with moelora.decode_graphs(False):
        ref = _generate(model, ids)
    _assert_same_generation(got, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mixlora", "lora_switch_merge"])
def test_disable_adapter_between_graphed_generations(method):
    """Paired benchmark timing: graphed adapter generate, base generate (adapter swapped out), and
    the adapter again, whose graphs still replay correctly (and no graph is captured for the base)."""
    _skip_without_cuda()
    model = _gpu_model(method, torch.float32)
    ids = torch.randint(4, 61, (1, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with moelora.disable_adapter(model):
        base = _generate(model, ids)
    first = _generate(model, ids)
    n = _captures(model)
    with moelora.disable_adapter(model):
        _assert_same_generation(_generate(model, ids), base, torch.float32)
    assert _captures(model) == n
    _assert_same_generation(_generate(model, ids), first, torch.float32)
    assert _captures(model) == n  # replays of the graphs captured before


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mixlora", "lora_switch", "lora"])
def test_graphed_decode_step_has_no_host_sync(method):
    _skip_without_cuda()
    model = _gpu_model(method, torch.bfloat16)
    ids = torch.randint(4, 61, (2, 8), device="cuda")
    with torch.no_grad():  # no attention mask: Hugging Face's own mask code syncs on one
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(4):  # steps 1-2 capture, then replays
            if step == 3:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(nxt, past_key_values=past, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    assert _captures(model) > 0


@pytest.mark.parametrize("method", ["lora", "mixlora", "lora_switch"])
def test_whole_model_decode_takes_the_graph_path_on_cpu(method, monkeypatch, request):
    from moelora_kernels import backend as kernel_backend

    if not kernel_backend.interpreted():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by the root conftest without CUDA)")
    """The layers' side of the graphs, on CPU: the Triton kernels run in the interpreter
    (``moelora.kernel_backend("triton")``), ``applies`` is forced on and the stand-in capture replays by calling
    the function. Every adapted module must capture at the second decode step and the generation
    must equal the ungraphed one (same kernels)."""
    backend = moelora.kernel_backend("triton")
    backend.__enter__()
    request.addfinalizer(lambda: backend.__exit__(None, None, None))
    monkeypatch.setattr(decode_graphs, "applies", lambda x, ctx: moelora.switches.SETTINGS.decode_graphs and x.is_contiguous()
                        and ctx is not None and ctx.cached_decode_step())
    monkeypatch.setattr(decode_graphs, "_cuda_capture", _fake_capture)
    cfg = {"lora": moelora.LoraConfig(r=4, lora_dropout=0.0),
           "mixlora": moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0),
           "lora_switch": moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                                                   switch_mode="unmerged")}[method]
    model = make_tiny("llama", hidden=32, inter=40, layers=2, heads=4, kv_heads=2)
    moelora.inject_adapter(model, cfg)
    randomize_adapter_(model, scale=0.2)
    for m in model.modules():
        if isinstance(m, moelora.MixLoraAdapter):
            m.backend = "fused"  # "auto" is fused on CUDA only
    ids = torch.randint(4, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    with moelora.decode_graphs(False):
        ref = _generate(model, ids, n=5)
    got = _generate(model, ids, n=5)
    modules = {"lora": 14, "mixlora": 2 * 4 + 2, "lora_switch": 14 + 1}[method]  # + the LoRA-Switch router
    assert decode_graphs.captured_graphs(model) == modules
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)



def test_mixed_adapter_decode_takes_the_graph_path_on_cpu(monkeypatch):
    """A batch of sequences on different LoRA adapters: every adapted linear graphs its frozen
    GEMM + gathered deltas at decode steps (stand-in capture on CPU), reading the per-token slots
    from the state's fixed buffer; the generation equals the ungraphed one and each row alone."""
    monkeypatch.setattr(decode_graphs, "applies", lambda x, ctx: moelora.switches.SETTINGS.decode_graphs
                        and x.is_contiguous() and ctx is not None and ctx.cached_decode_step())
    monkeypatch.setattr(decode_graphs, "_cuda_capture", _fake_capture)
    model = make_tiny("llama", hidden=32, inter=40, layers=2, heads=4, kv_heads=2)
    moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_dropout=0.0), adapter_name="a")
    moelora.add_adapter(model, "b", moelora.LoraConfig(r=2, lora_dropout=0.0, target_modules=("q_proj", "down_proj")))
    randomize_adapter_(model, scale=0.2)
    ids = torch.randint(4, 61, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["a", None, "b"]

    def gen():
        with torch.no_grad():
            r = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                               do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                               adapter_names=names)
        return r.sequences, torch.stack(r.logits).float()

    with moelora.decode_graphs(False):
        ref = gen()
    got = gen()
    assert decode_graphs.captured_graphs(model) == 14  # every adapted linear of the 2 layers
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for i, n in enumerate(names):
        with moelora.use_adapter(model, n), torch.no_grad():
            one = model.generate(ids[i:i + 1], attention_mask=torch.ones_like(ids[i:i + 1]), max_new_tokens=5,
                                 min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(one[0], got[0][i])


def test_block_diagonal_lora_decode_takes_the_graph_path_on_cpu(monkeypatch):
    """BdLoRA's decode step (frozen GEMM + blockwise delta) is graphed like plain LoRA's: every
    adapted linear captures at the second decode step and the tokens and logits equal the
    ungraphed generation (the stand-in capture calls the function)."""
    monkeypatch.setattr(decode_graphs, "applies", lambda x, ctx: moelora.switches.SETTINGS.decode_graphs and x.is_contiguous()
                        and ctx is not None and ctx.cached_decode_step())
    monkeypatch.setattr(decode_graphs, "_cuda_capture", _fake_capture)
    model = make_tiny("llama", hidden=32, inter=40, layers=2, heads=4, kv_heads=2)
    moelora.inject_adapter(model, moelora.BdLoraConfig(r=4, nblocks=2, lora_dropout=0.0))
    randomize_adapter_(model, scale=0.2)
    ids = torch.randint(4, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    with moelora.decode_graphs(False):
        ref = _generate(model, ids, n=5)
    got = _generate(model, ids, n=5)
    assert decode_graphs.captured_graphs(model) == 14  # 7 linears x 2 layers
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)


def test_decode_kernels_and_graphs_never_take_dtensors(monkeypatch):
    """A tensor-parallel model (moelora.parallel) feeds DTensors: neither the Triton decode kernels
    (local memory) nor the decode graphs apply, whatever the backend says."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from moelora.layers.dispatch import decode_kernels_apply

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        x = distribute_tensor(torch.randn(2, 8), init_device_mesh("cpu", (1,)), [Replicate()])
        module = torch.nn.Linear(8, 8).eval()
        monkeypatch.setattr("moelora.layers.dispatch.triton_kernels_for", lambda t: True)
        with torch.no_grad():
            assert decode_kernels_apply(torch.randn(2, 8), module)  # the control: a plain tensor
            assert not decode_kernels_apply(x, module)
    finally:
        if created:
            dist.destroy_process_group()
