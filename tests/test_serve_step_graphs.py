"""Serving steps as CUDA graphs of padded token buckets (issue 16; ``decode_graphs.step_applies``):
a mixed packed step of few tokens pads every adapted linear's and every MixLoRA FFN's input to a
bucket and replays that bucket's graph. On CPU with a stand-in capture that replays by calling the
function (tests/test_decode_graphs.py): the graphed steps equal the direct ones for any token
count, the graphs are shared across token counts of one bucket, a rebuilt stack is captured
again, and the routing records cover the step's real tokens only."""
from __future__ import annotations

import pytest
import torch

import moelora
from moelora.layers import decode_graphs
from moelora.layers.adapted import AdaptedFFN, AdaptedLinear
from moelora.state import BatchPlan
from moelora.switches import SETTINGS

from conftest import make_tiny, randomize_adapter_
from test_decode_graphs import _fake_capture


@pytest.fixture
def cpu_graphs(monkeypatch):
    """step_applies without its CUDA condition, and the stand-in capture."""
    monkeypatch.setattr(decode_graphs, "step_applies", lambda x, ctx: (
        SETTINGS.decode_graphs and ctx.plan.graph_step and x.is_contiguous()
        and decode_graphs.bucket(x.shape[0]) is not None))
    monkeypatch.setattr(decode_graphs, "_cuda_capture", _fake_capture)


def _model(switch: bool = False):
    m = make_tiny("llama", hidden=32, inter=40, layers=2, heads=4, kv_heads=2)
    moelora.add_adapter(m, "l0", moelora.LoraConfig(r=4, lora_dropout=0.0), trainable=False)  # all 7 linears
    moelora.add_adapter(m, "l1", moelora.LoraConfig(r=2, lora_dropout=0.0, target_modules=("q_proj", "down_proj")),
                        trainable=False)
    moelora.add_adapter(m, "m0", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4), trainable=False)
    moelora.add_adapter(m, "m1", moelora.MixLoraConfig(num_experts=3, top_k=1, r=2), trainable=False)
    if switch:
        moelora.add_adapter(m, "s0", moelora.LoraSwitchConfig(num_experts=3, r=2), trainable=False)
    randomize_adapter_(m, scale=0.2, seed=3)
    return m.eval()


NAMES = ("l0", "l1", "m0", "m1", None)


def _step(m, n: int, seed: int, graph_step: bool, names=NAMES):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, len(names), (n,), generator=g)
    ids = torch.randint(3, 60, (1, n), generator=g)
    plan = BatchPlan.per_token(names, slots, graph_step=graph_step)
    with torch.no_grad():
        logits = m(ids, adapter_names=plan).logits.clone()
    return logits, {a: moelora.router_statistics(m, a) for a in ("m0", "m1")}


def _captures(m, kind) -> int:
    return sum(decode_graphs.cache_for(mod).captures for mod in m.modules() if isinstance(mod, kind))


def test_graphed_serving_steps_equal_direct_ones(cpu_graphs):
    m = _model()
    # token counts 5 and 7 share the 8-token bucket (captured at the second step, replayed after),
    # 11 and 13 the 16-token one; 70 is over the largest bucket (direct)
    for i, n in enumerate((5, 7, 5, 11, 13, 11, 70, 3)):
        got, got_stats = _step(m, n, seed=i, graph_step=True)
        ref, ref_stats = _step(m, n, seed=i, graph_step=False)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        for a in ("m0", "m1"):  # the records cover the real tokens only, not the bucket's padding
            assert len(got_stats[a]) == len(ref_stats[a]) == 2
            for x, y in zip(got_stats[a], ref_stats[a]):
                torch.testing.assert_close(torch.as_tensor(x["load"]), torch.as_tensor(y["load"]))
    # every FFN captured one graph per bucket (8 and 16) and ran its projections inside it: the
    # projections' own forwards were never called in a graphed step, the attention linears were
    assert _captures(m, AdaptedFFN) == 2 * 2
    assert _captures(m, AdaptedLinear) == 2 * 2 * 4  # q, k, v, o of 2 layers, 2 buckets


def test_a_rebuilt_stack_is_captured_again_and_stays_correct(cpu_graphs):
    m = _model()
    for i in range(3):
        _step(m, 6, seed=i, graph_step=True)
    before = _captures(m, AdaptedLinear)
    moelora.add_adapter(m, "big", moelora.LoraConfig(r=8, lora_dropout=0.0), trainable=False)  # a larger rank
    randomize_adapter_(m, scale=0.2, seed=9)
    names = ("l0", "big", "m0", "m1", None)
    for i in range(3):
        got, _ = _step(m, 6, seed=10 + i, graph_step=True, names=names)
        ref, _ = _step(m, 6, seed=10 + i, graph_step=False, names=names)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert _captures(m, AdaptedLinear) > before
    # one entry per graphed module (its one bucket): the old stacks' graphs were replaced, not kept
    assert all(len(decode_graphs.cache_for(mod).entries) <= 1 for mod in m.modules() if isinstance(mod, (AdaptedLinear, AdaptedFFN)))


def test_lora_switch_rows_keep_the_eager_path_inside_a_graphed_step(cpu_graphs):
    m = _model(switch=True)
    names = ("l0", "s0", "m0", None)
    for i in range(3):
        got, _ = _step(m, 6, seed=i, graph_step=True, names=names)
        ref, _ = _step(m, 6, seed=i, graph_step=False, names=names)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_graph_steps_need_the_plan_flag_and_the_switch(cpu_graphs):
    m = _model()
    for i in range(3):
        _step(m, 6, seed=i, graph_step=False)
    assert _captures(m, AdaptedLinear) == _captures(m, AdaptedFFN) == 0
    with moelora.decode_graphs(False):
        for i in range(3):
            _step(m, 6, seed=i, graph_step=True)
    assert _captures(m, AdaptedLinear) == _captures(m, AdaptedFFN) == 0


def test_step_graphs_never_apply_on_cpu_tensors():
    plan = BatchPlan.per_token(("a", None), torch.zeros(4, dtype=torch.long), graph_step=True)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.plan = plan
    assert not decode_graphs.step_applies(torch.randn(4, 8), ctx)
    assert decode_graphs.bucket(1) == 8 and decode_graphs.bucket(9) == 16 and decode_graphs.bucket(65) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_step_graphs_equal_direct_steps_on_cuda(dtype):
    """The real capture (CUDA graphs, Triton gathered kernels inside) against the direct kernels,
    for token counts that share buckets; fp32 tight, bf16 loose."""
    m = _model().to("cuda", dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for i, n in enumerate((5, 7, 5, 11, 13, 11, 3, 6)):
        g = torch.Generator().manual_seed(i)
        slots = torch.randint(0, len(NAMES), (n,), generator=g).cuda()
        ids = torch.randint(3, 60, (1, n), generator=g).cuda()
        with torch.no_grad():
            got = m(ids, adapter_names=BatchPlan.per_token(NAMES, slots, graph_step=True)).logits.float().clone()
            ref = m(ids, adapter_names=BatchPlan.per_token(NAMES, slots, graph_step=False)).logits.float()
        torch.testing.assert_close(got, ref, **tol)
    assert _captures(m, AdaptedFFN) == 2 * 2 and _captures(m, AdaptedLinear) == 2 * 2 * 4


def _bounded_step(m, n: int, seed: int, names, bounds):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, len(names), (n,), generator=g)
    ids = torch.randint(3, 60, (1, n), generator=g)
    plan = BatchPlan.per_token(names, slots, graph_step=bounds is not None, bounds=bounds)
    with torch.no_grad():
        return m(ids, adapter_names=plan).logits.clone()


def test_bounded_stacks_are_written_in_place_and_keep_their_graphs(cpu_graphs):
    """With ``StackBounds`` (the serving engine's plans) the stacks are built at the bounds' sizes,
    so later compositions (a larger rank within the bound, a MixLoRA adapter of more experts and
    a larger top-k, every position changed at once) are written into the same tensors: no graph
    is captured again, and every step equals an independent copy of the model run directly."""
    import copy

    from moelora.state import StackBounds

    m = _model()
    moelora.add_adapter(m, "big", moelora.LoraConfig(r=8, lora_dropout=0.0), trainable=False)
    randomize_adapter_(m, scale=0.2, seed=9)
    ref = copy.deepcopy(m)  # its own stacks, built without bounds
    bounds = StackBounds(rank=8, experts=4, top_k=2, expert_rank=4)
    # (a site first gets stacks when an adapter targeting it comes: its graph is then captured once
    # more; the engine's warm-up builds the stacks of every served config)
    compositions = [("l1", "m1", "l0", None, None),  # ranks 2 and 4, 3 experts top-1 first
                    ("big", "l0", "m0", "m1", None),  # rank 8, 4 experts top-2: every position changes
                    ("big", None, "m1", "l0", None)]
    site = m.model.layers[0].self_attn.q_proj
    ffn = m.model.layers[1].mlp
    captured = stacks = None
    for c, names in enumerate(compositions):
        for i in range(3):
            got = _bounded_step(m, 6, seed=10 * c + i, names=names, bounds=bounds)
            want = _bounded_step(ref, 6, seed=10 * c + i, names=names, bounds=None)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        now = (site.batch_stacks[2][0].data_ptr(), ffn.batch_stacks[2]["A"]["up"].data_ptr())
        if c == 0:
            captured, stacks = _captures(m, AdaptedLinear) + _captures(m, AdaptedFFN), now
            assert captured > 0
            assert site.batch_stacks[2][0].shape[1] == 8 and ffn.batch_stacks[2]["emax"] == 4
            assert ffn.batch_stacks[2]["A"]["up"].shape[1] == 4 and ffn.batch_stacks[2]["K"] == 2
        else:
            assert now == stacks  # the same tensors, written in place
            assert _captures(m, AdaptedLinear) + _captures(m, AdaptedFFN) == captured


def _replays(m) -> int:
    return sum(e[1].graph.replays for mod in m.modules() for e in decode_graphs.cache_for(mod).entries.values()
               if isinstance(e[1], decode_graphs._Captured))


def test_engine_warmup_captures_every_bucket_before_the_first_request(cpu_graphs):
    """``Engine.warmup()`` (run at start) captures each adapted module's graph of every token
    bucket for the served adapters; requests afterwards (other adapters in other positions,
    prefill and decode steps of 1-64 tokens) capture none and equal offline ``generate``."""
    from moelora.serve import Engine

    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "lora8", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    moelora.add_adapter(m, "lora8b", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize_adapter_(m, seed=3)
    m.eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3, 3], [20, 21]]
    names = ["lora8b", "mix", None, "lora", "lora8b"]
    refs = [m.generate(torch.tensor([p]), adapter_names=[n], max_new_tokens=6, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(p):].tolist() for p, n in zip(prompts, names)]
    eng = Engine(m, max_new_tokens=6, eos_token_id=-1, max_pending=8, max_resident_adapters=4, max_adapters_per_step=3)
    try:
        w = eng.metrics()["warmup"]
        assert "skipped" not in w, w
        assert sorted(w["adapters"]) == ["lora", "lora8", "mix"]  # one per config (lora8b shares lora8's)
        assert w["resident"] == 4 and w["prefilled"] == 1  # the 4-slot pool filled: lora8b too
        assert w["prefill_tokens"] == [128, 129]  # eager steps past the buckets (kernel compiles), no graphs
        graphs = decode_graphs.captured_graphs(m)
        # every adapted module captured each of the 4 buckets (the FFNs' projections inside theirs too)
        assert graphs == w["graphs"] == 4 * w["modules"]
        replays = _replays(m)
        rids = [eng.submit(p, n) for p, n in zip(prompts, names)]
        assert [list(eng.stream(r)) for r in rids] == refs
        assert eng.mixed_steps > 0 and _replays(m) > replays  # the steps replayed the warm-up's graphs
        assert decode_graphs.captured_graphs(m) == graphs  # nothing captured while serving
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mix_cap", [None, 1])
def test_engine_on_cuda_warms_up_and_equals_generate(mix_cap):
    """The engine on CUDA (fp32): the warm-up captures the real graphs of every bucket, requests
    of several adapters then replay them without a capture, and every response equals offline
    ``generate`` with its adapter alone; also with MixLoRA in stack positions of its own
    (``max_mixlora_per_step``), where the expert stacks hold one position."""
    from moelora.serve import Engine

    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "lora8", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize_adapter_(m, seed=3)
    m = m.eval().to("cuda")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3, 3], [20, 21], [9, 8, 7, 6]]
    names = ["lora8", "mix", None, "lora", "mix", "lora8"]
    refs = [m.generate(torch.tensor([p], device="cuda"), adapter_names=[n], max_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p, n in zip(prompts, names)]
    eng = Engine(m, max_new_tokens=8, eos_token_id=-1, max_pending=8, max_resident_adapters=4,
                 max_adapters_per_step=3, max_mixlora_per_step=mix_cap, adapter_memory_gb=0.5, num_blocks=64)
    try:
        w = eng.metrics()["warmup"]
        assert "skipped" not in w and w["graphs"] == 4 * w["modules"], w
        assert w["stack_bytes"] > 0
        graphs = decode_graphs.captured_graphs(m)
        rids = [eng.submit(p, n) for p, n in zip(prompts, names)]
        assert [list(eng.stream(r)) for r in rids] == refs
        assert eng.mixed_steps > 0 and decode_graphs.captured_graphs(m) == graphs
        if mix_cap is not None:
            ffn = next(mod for mod in m.modules() if isinstance(mod, AdaptedFFN) and mod.batch_stacks is not None)
            assert ffn.batch_stacks[2]["router"].shape[0] == ffn.batch_stacks[2]["emax"]
    finally:
        eng.close()


def _site_graphs(m) -> int:
    """Live captured graphs of the adapted linears (an FFN site is unwrapped, its graphs with it,
    when its last MixLoRA slot goes)."""
    return sum(isinstance(e[1], decode_graphs._Captured) for mod in m.modules() if isinstance(mod, AdaptedLinear)
               for e in decode_graphs.cache_for(mod).entries.values())


def test_a_slot_eviction_keeps_the_sites_serving_graphs(cpu_graphs):
    """A swap to an adapter whose config has no free slot evicts a slot of another config
    (``delete_adapter``). That must not throw away the sites' graphs of every bucket: each lost
    one would be captured again inside a timed step (on the GPU, seconds per bucket, 7B shape).
    The tokens stay those of offline ``generate``, the evictions happen, the graphs survive."""
    from moelora.serve import Engine

    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="l1")
    moelora.add_adapter(m, "l2", moelora.LoraConfig(r=4))
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    randomize_adapter_(m, seed=3)
    m.eval()
    pairs = (("l1", "l2"), ("mix", "l1"), ("l2", "l1"))
    prompts = ([5, 6, 7], [5, 6, 7, 8])
    refs = [[m.generate(torch.tensor([p]), adapter_names=[a], max_new_tokens=8, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p, a in zip(prompts, pair)] for pair in pairs]
    # two slots and two per step: serving "mix" (a config without a slot) evicts a LoRA slot
    eng = Engine(m, max_new_tokens=8, eos_token_id=-1, max_resident_adapters=2, max_adapters_per_step=2,
                 warmup=False)
    try:
        eng.registry.fill(["l1", "l2"])
        eng.warmup()
        before = _site_graphs(m)
        assert before > 0
        for pair, ref in zip(pairs, refs):
            rids = [eng.submit(p, a) for p, a in zip(prompts, pair)]
            assert [list(eng.stream(r)) for r in rids] == ref
        assert eng.registry.stats()["evictions"] >= 1
        assert _site_graphs(m) >= before
    finally:
        eng.close()


def test_serving_benchmark_rows_count_the_graphs_captured_inside_a_run(cpu_graphs):
    """``moelora.bench.serve`` rows say how many decode graphs the timed run captured (each one a
    step that waited for it) and which step launched longest: 0 after the warm-up, more when the
    graphs were dropped before the run."""
    from moelora.bench import serve as bench
    from moelora.serve import Engine

    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="a")
    moelora.add_adapter(m, "b", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    randomize_adapter_(m, seed=5)
    m.eval()
    reqs = [bench.Req(arrival=0.0, adapter=i % 2, prompt=[3 + i, 4, 5], out_len=6) for i in range(4)]
    eng = Engine(m, max_new_tokens=6, eos_token_id=-1, max_resident_adapters=2, max_adapters_per_step=2)
    try:
        warm = bench.run_engine(eng, reqs, ["a", "b"], 60, torch.device("cpu"))
        assert warm["completed"] == 4 and warm["graph_captures"] == 0
        assert warm["kernel_compiles"]["count"] == 0  # the interpreter compiles nothing; the GPU run says
        step = warm["step_times"]["launch_max_step"]
        assert 0 <= step["index"] < warm["step_times"]["steps_timed"] and step["tokens"] >= 1
        decode_graphs.clear_decode_graphs(m)
        cold = bench.run_engine(eng, reqs, ["a", "b"], 60, torch.device("cpu"))
        assert cold["completed"] == 4 and cold["graph_captures"] > 0
    finally:
        eng.close()


def test_engine_warmup_launches_every_kernel_variant_that_serving_launches(cpu_graphs):
    """A kernel variant launched for the first time compiles (0.3-0.7 s each on the GPU, 7B shape):
    inside a timed serving step that is a stall (H100, 1000 adapters: six compiles, 2.8-3.1 s, in
    the first step after the warm-up, one request's prefill: a uniform step, the adapter's own
    kernels). Under the interpreter each launch's compile key is recorded
    (``moelora_kernels.launch_keys``): requests served alone (uniform steps: prefill of more than
    64 tokens, then one-token decode) and together (mixed steps) launch no variant that
    ``Engine.warmup()`` did not. MixLoRA with 8 experts of rank 16: its own prefill takes the tile
    kernels (8·16 columns), the mixed steps' stacks the gather ones, as at the 7B shape."""
    from moelora.serve import Engine
    from moelora_kernels import backend as kernel_backend
    from moelora_kernels import launch_keys

    if not kernel_backend.interpreted():  # on a GPU machine: CPU tensors would take the torch paths
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, set by the root conftest without CUDA)")
    m = make_tiny(layers=1)
    moelora.inject_adapter(m, moelora.LoraConfig(r=4, target_modules=("q_proj", "down_proj")), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, expert_backend="fused",
                                                        attention_target_modules=("v_proj",)))
    randomize_adapter_(m, seed=3)
    m.eval()
    g = torch.Generator().manual_seed(0)
    long_p, short_p = torch.randint(3, 60, (90,), generator=g).tolist(), [5, 6, 7]
    with moelora.kernel_backend("triton"):
        eng = Engine(m, max_new_tokens=3, eos_token_id=-1, max_pending=8, max_resident_adapters=2,
                     max_adapters_per_step=2, warmup=False)
        try:
            with launch_keys.recording() as warm:
                stats = eng.warmup(buckets=(8, 64))  # two buckets: the interpreter is slow
            assert "skipped" not in stats and stats["uniform_tokens"] == [1, 128, 129], stats
            with launch_keys.recording() as served:
                for p in (long_p, short_p):  # alone: uniform steps
                    assert len(list(eng.stream(eng.submit(p, "mix")))) == 3
                rids = [eng.submit(p, n) for p, n in ((long_p, "mix"), (short_p, "lora"), (short_p, None))]
                assert all(len(list(eng.stream(r))) == 3 for r in rids)
            assert eng.mixed_steps > 0
            uniform = {k[0] for k in served}
            assert {"_moe_hidden_kernel", "_shrink_tile_kernel"} <= uniform, uniform  # the paths above ran
            new = served - warm
            assert not new, f"{len(new)} variants launched after the warm-up: {sorted(k[0] for k in new)}"
        finally:
            eng.close()
