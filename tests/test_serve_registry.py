"""moelora.serve's adapter registry and admission: a host cache, a bounded pool of device slots
(LRU, pinned while in use), the per-step adapter cap with FIFO fairness, and seeded sampling.
Every greedy response still equals offline ``model.generate`` with that adapter alone (fp32 CPU)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

import moelora
from moelora.serve import Engine
from moelora.layers.adapted import AdaptedFFN
from moelora.serve.engine import wait_until

from conftest import make_tiny, randomize_adapter_

NEW = 8
NAMES = ["a", "b", "c", "d"]


def _model():
    """Four adapters of three configs: a and d share one (their slots can be reused by a copy)."""
    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="a")
    moelora.add_adapter(m, "b", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "c", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    moelora.add_adapter(m, "d", moelora.LoraConfig(r=4))
    randomize_adapter_(m, seed=11)
    return m.eval()


def _offline(m, prompt, name, new=NEW):
    out = m.generate(torch.tensor([prompt]), adapter_names=[name], max_new_tokens=new, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    m = _model()
    root = tmp_path_factory.mktemp("adapters")
    for n in NAMES:
        moelora.save_adapter(m, root / n, adapter_name=n)
    refs = {(i, n): _offline(m, p, n) for i, p in enumerate(PROMPTS) for n in NAMES}
    return root, refs


def _run_all(eng, jobs):
    """Submit every (prompt index, adapter) at once, from threads; the outputs in order."""
    results, threads = {}, []

    def client(k, i, n):
        results[k] = eng.generate(PROMPTS[i], n)

    for k, (i, n) in enumerate(jobs):
        threads.append(threading.Thread(target=client, args=(k, i, n)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [results.get(k) for k in range(len(jobs))]


def test_two_slots_four_adapters_token_exact(saved):
    root, refs = saved
    eng = Engine(make_tiny(), adapters_dir=root, max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=2)
    peak = []
    stop = threading.Event()

    def watch():  # the resident set, sampled while requests run
        while not stop.is_set():
            peak.append(len(eng.registry.slots))
            time.sleep(0.002)

    w = threading.Thread(target=watch)
    w.start()
    try:
        assert sorted(eng.adapter_names()) == NAMES
        assert eng.metrics()["cached_on_host"] == 0  # lazy: nothing read before a request needs it
        jobs = [(i, n) for i in range(len(PROMPTS)) for n in NAMES]
        outs = _run_all(eng, jobs)
        assert outs == [refs[j] for j in jobs]
        met = eng.metrics()
        assert met["peak_resident_slots"] <= 2 and max(peak) <= 2 and met["resident_slots"] <= 2
        assert met["swaps"] >= 4 and met["loads"] == 4  # every adapter came in; each file read once
        sizes = {n: eng.registry.adapters[n].nbytes for n in NAMES}
        assert met["h2d_bytes"] >= sum(sizes.values())
        assert met["pinned"] == {}  # every pin released
        # one at a time through the same two slots (a/d share a config: a slot reused by copying)
        for n in ["a", "d", "a", "c", "b", "d"]:
            assert eng.generate(PROMPTS[0], n) == refs[(0, n)], n
        assert eng.metrics()["slot_reuses"] > 0
    finally:
        stop.set()
        w.join()
        eng.close()


def test_pinned_adapter_is_not_evicted_and_the_next_waits():
    m = _model()
    long_ref = _offline(m, PROMPTS[0], "a", new=40)
    ref_b = _offline(m, PROMPTS[1], "b")
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=1)
    try:
        assert eng.metrics()["resident_slots"] == 0  # the model's own adapters went to the host cache
        ra = eng.submit(PROMPTS[0], "a", max_new_tokens=40)
        assert wait_until(lambda: eng.registry.pins("a") == 1)
        with eng._model_lock:  # the loop holds still: a cannot finish meanwhile
            rb = eng.submit(PROMPTS[1], "b")
            assert eng.queued() == 1 and eng.registry.resident() == ["a"]  # b waits: the only slot is pinned
            with eng._admit_lock:
                assert eng.registry.acquire("b") is None  # a pinned slot is never evicted
            assert eng.registry.resident() == ["a"]
        assert list(eng.stream(ra)) == long_ref
        assert list(eng.stream(rb)) == ref_b
        assert eng.registry.resident() == ["b"] and eng.metrics()["pinned"] == {}
        # cancel releases the pin too
        rc = eng.submit(PROMPTS[0], "c", max_new_tokens=40)
        eng.cancel(rc)
        assert eng.registry.pins("c") == 0
        assert eng.generate(PROMPTS[1], "b") == ref_b
    finally:
        eng.close()
    # close() put the model's adapters back
    assert sorted(a["name"] for a in moelora.list_adapters(m)) == NAMES
    assert _offline(m, PROMPTS[1], "b") == ref_b


def test_byte_budget_bounds_the_pool(saved):
    root, refs = saved
    probe = Engine(make_tiny(), adapters_dir=root, max_new_tokens=NEW, eos_token_id=-1)
    for n in NAMES:
        probe.registry._fill(probe.registry.adapters[n])
    sizes = {n: probe.registry.adapters[n].nbytes for n in NAMES}
    probe.close()
    budget = max(sizes.values()) * 1.5  # room for one adapter at a time, whichever it is
    eng = Engine(make_tiny(), adapters_dir=root, max_new_tokens=NEW, eos_token_id=-1,
                 adapter_memory_gb=budget / 2**30)
    try:
        jobs = [(i % len(PROMPTS), n) for i, n in enumerate(NAMES * 2)]
        assert _run_all(eng, jobs) == [refs[j] for j in jobs]
        met = eng.metrics()
        assert met["peak_resident_bytes"] <= budget and met["resident_bytes"] <= budget
        assert sum(sizes.values()) > budget and met["evictions"] >= 1 and met["swaps"] >= len(NAMES)
        # the pool counts what its slots hold on the device (measured per config), not only host bytes
        assert eng.registry._key_bytes and all(s.nbytes == eng.registry._key_bytes[s.key] for s in eng.registry.slots)
        assert all(b >= min(sizes.values()) for b in eng.registry._key_bytes.values())
        # an adapter larger than the engine's memory plan allows for is refused with the knob to change
        eng.registry.max_part_bytes = (min(sizes.values()) - 1, 2**40)
        eng.registry.clear()
        with pytest.raises(Exception, match="plain-LoRA tensors.*max_adapter_gb"):
            eng.generate(PROMPTS[0], "a")
        # a MixLoRA adapter's experts and router are bounded apart (the expert stacks)
        lora_b, expert_b = eng.registry.part_bytes(eng.registry.adapters["b"])
        assert expert_b > 0 and lora_b + expert_b == sizes["b"] and eng.registry.part_bytes(eng.registry.adapters["a"]) == (sizes["a"], 0)
        eng.registry.max_part_bytes = (2**40, expert_b - 1)
        with pytest.raises(Exception, match="MixLoRA expert and router tensors.*max_expert_gb"):
            eng.generate(PROMPTS[0], "b")
        eng.registry.max_part_bytes = None
        assert eng.generate(PROMPTS[0], "b") == refs[(0, "b")]  # a refusal changed nothing
    finally:
        eng.close()


def test_adapter_cap_per_step_and_no_starvation():
    """max_adapters_per_step=1: no packed step mixes two adapters; a request to a cold adapter
    queued behind hot ones is overtaken at most max_bypass times, so it finishes before the hot
    requests submitted after it."""
    m = _model()
    ref_a, ref_b = _offline(m, PROMPTS[0], "a"), _offline(m, PROMPTS[1], "b")
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_adapters_per_step=1, max_bypass=2, max_pending=32)
    done: dict[str, float] = {}
    outs: dict[str, list] = {}

    def consume(rid):
        outs[rid] = list(eng.stream(rid))
        done[rid] = time.monotonic()

    try:
        eng.generate(PROMPTS[1], "b")  # both resident: the submits below need no change of the model,
        eng.generate(PROMPTS[0], "a")  # so holding the loop's lock cannot block them
        with eng._model_lock:  # hold the loop: everything is queued before the first step
            before = [eng.submit(PROMPTS[0], "a") for _ in range(3)]
            cold = eng.submit(PROMPTS[1], "b")
            after = [eng.submit(PROMPTS[0], "a") for _ in range(8)]
            assert eng.queued() == 1 + 8 - 2  # b waits; two later a's overtook it, the rest wait behind it
        threads = [threading.Thread(target=consume, args=(r,)) for r in before + [cold] + after]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert outs[cold] == ref_b and all(outs[r] == ref_a for r in before + after)
        assert done[cold] < max(done[r] for r in after)
        assert sum(done[r] > done[cold] for r in after) >= 6  # all but the two that overtook it
        met = eng.metrics()
        assert met["max_adapters_seen_per_step"] == 1
        # every request's wait from submit to entering CB is kept; the cold one waited behind the loop
        waits = met["admission_wait_ms"]
        assert waits["n"] == 2 + 12 and 0 <= waits["p50"] <= waits["p99"] <= waits["max"] and waits["max"] > 0
    finally:
        eng.close()


def test_sampling_seeded_and_greedy():
    m = _model()
    ref = _offline(m, PROMPTS[0], "a", new=12)
    eng = Engine(m, max_new_tokens=12, eos_token_id=-1)
    try:
        assert eng.generate(PROMPTS[0], "a", temperature=0.0) == ref  # temperature 0: greedy, token-exact
        s1 = eng.generate(PROMPTS[0], "a", temperature=1.0, seed=7)
        # the same seed again, now packed with other requests (greedy and sampled, other adapters)
        rids = [eng.submit(PROMPTS[1], "b", temperature=0.8, top_p=0.9, seed=3),
                eng.submit(PROMPTS[0], "a", temperature=1.0, seed=7),
                eng.submit(PROMPTS[2], None),
                eng.submit(PROMPTS[0], "a", temperature=1.0, seed=8)]
        outs = [list(eng.stream(r)) for r in rids]
        assert outs[1] == s1
        assert s1 != ref and outs[3] != s1  # it really sampled, and the seed matters
        assert eng.generate(PROMPTS[1], "b", temperature=0.8, top_p=0.9, seed=3) == outs[0]
        assert len(set(eng.generate(PROMPTS[0], "a", temperature=5.0, top_p=1e-6, seed=s)[0] for s in range(3))) == 1
        for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-2),
                    dict(temperature=float("nan"))):
            with pytest.raises(ValueError):
                eng.submit(PROMPTS[0], "a", **bad)
    finally:
        eng.close()


def test_in_memory_adapters_share_host_storage():
    """Adapters registered from one host tensor set keep that storage (no copy per adapter): what
    makes 1000 synthetic adapters of a 7B shape fit in host memory (moelora.bench.serve)."""
    m = _model()
    cfg = moelora.get_adapter_config(m, "a")
    sd = {k: v.detach().clone() for k, v in moelora.adapter_state_dict(m, "a").items()}
    ref = _offline(m, PROMPTS[0], "a")
    eng = Engine(make_tiny(), max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=1)
    try:
        for i in range(3):
            eng.add_adapter_tensors(f"x{i}", cfg, sd)
        ptrs = {i: {k: t.data_ptr() for k, t in eng.registry.adapters[f"x{i}"].tensors.items()} for i in range(3)}
        assert ptrs[0] == ptrs[1] == ptrs[2] == {k: t.data_ptr() for k, t in sd.items()}
        assert [eng.generate(PROMPTS[0], f"x{i}") for i in range(3)] == [ref] * 3
        assert eng.metrics()["swaps"] == 3 and eng.metrics()["slot_reuses"] == 2  # one slot, copied into twice
    finally:
        eng.close()


def test_queued_request_prefetches_its_adapter():
    """b waits behind the per-step cap while a runs; its adapter is made resident meanwhile
    (prefetch: in a free slot, not pinned), so it starts without a swap once a is done."""
    m = _model()
    ref_a, ref_b = _offline(m, PROMPTS[0], "a", new=60), _offline(m, PROMPTS[1], "b")
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=2, max_adapters_per_step=1)
    try:
        ra = eng.submit(PROMPTS[0], "a", max_new_tokens=60)
        rb = eng.submit(PROMPTS[1], "b")
        assert wait_until(lambda: "b" in eng.registry.resident(), 30)
        prefetched_while_a_ran = eng.registry.pins("a") == 1 and eng.queued() == 1 and eng.registry.pins("b") == 0
        swaps = eng.metrics()["swaps"]
        assert list(eng.stream(ra)) == ref_a and list(eng.stream(rb)) == ref_b
        assert prefetched_while_a_ran and eng.metrics()["swaps"] == swaps  # b needed no swap when it entered
    finally:
        eng.close()


def test_stack_bounds_cover_every_registered_adapter():
    """The engine's plans carry the registry's ``StackBounds``: the largest rank of the stacked
    linears (LoRA and MixLoRA's attention LoRA), MixLoRA's experts, top-k and expert rank apart
    (a rank-64 LoRA does not size the expert stacks), LoRA-Switch left out (its rows run apart);
    registering or unregistering an adapter recomputes them."""
    from moelora.serve.registry import AdapterRegistry
    from moelora.state import StackBounds

    m = make_tiny()
    reg = AdapterRegistry(m)
    assert reg.stack_bounds() is None
    reg.register_tensors("l", moelora.LoraConfig(r=16), {})
    reg.register_tensors("m", moelora.MixLoraConfig(num_experts=6, top_k=3, r=4), {})
    reg.register_tensors("s", moelora.LoraSwitchConfig(num_experts=9, r=32), {})
    assert reg.stack_bounds() == StackBounds(rank=16, experts=6, top_k=3, expert_rank=4)
    reg.register_tensors("m2", moelora.MixLoraConfig(num_experts=2, top_k=1, r=8), {})
    assert reg.stack_bounds() == StackBounds(rank=16, experts=6, top_k=3, expert_rank=8)
    reg.unregister("l")
    assert reg.stack_bounds() == StackBounds(rank=8, experts=6, top_k=3, expert_rank=8)


def test_fill_warms_the_pool_without_evicting(saved):
    """``AdapterRegistry.fill`` (the engine warm-up's warm start) makes adapters resident in order
    while the pool has room and evicts nothing; a later swap of an adapter whose config matches a
    resident slot's copies into it (no new slot); responses stay exact."""
    root, refs = saved
    eng = Engine(make_tiny(), adapters_dir=root, max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=2)
    try:
        with eng._model_lock, eng._admit_lock:
            assert eng.registry.fill(NAMES) == ["a", "b"]  # the pool holds 2: c and d are left out
            assert eng.registry.fill(NAMES) == []  # full: nothing evicted
        met = eng.metrics()
        assert sorted(met["resident"]) == ["a", "b"] and met["evictions"] == 0
        slots = {s.model_name for s in eng.registry.slots}
        assert eng.generate(PROMPTS[1], "d") == refs[(1, "d")]  # d has a's config: a's slot is reused
        assert {s.model_name for s in eng.registry.slots} == slots and eng.metrics()["slot_reuses"] >= 1
        assert eng.generate(PROMPTS[0], "b") == refs[(0, "b")]
    finally:
        eng.close()
    # a pool with room for all four: d gets its own slot although a's (same config, unpinned) could take it
    eng = Engine(make_tiny(), adapters_dir=root, max_new_tokens=NEW, eos_token_id=-1, max_resident_adapters=4)
    try:
        with eng._model_lock, eng._admit_lock:
            assert eng.registry.fill(NAMES) == NAMES
        met = eng.metrics()
        assert sorted(met["resident"]) == NAMES and met["evictions"] == 0 and met["swaps"] == 4
        assert eng.generate(PROMPTS[2], "a") == refs[(2, "a")] and eng.metrics()["swaps"] == 4  # a hit
    finally:
        eng.close()


def test_mixlora_positions_of_their_own_token_exact():
    """``max_mixlora_per_step=1`` (of 4 per step) with two MixLoRA adapters (other expert counts and
    top-k) and three LoRA ones, all requests queued at once: every response equals offline generate; no more than one
    MixLoRA adapter is ever inside CB; the stack table keeps MixLoRA adapters in position 0 and the
    others after it; every FFN's expert stacks hold one position's experts (+ the zero expert)."""
    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="a")
    moelora.add_adapter(m, "mx1", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "c", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    moelora.add_adapter(m, "mx2", moelora.MixLoraConfig(num_experts=2, top_k=1, r=2))
    moelora.add_adapter(m, "d", moelora.LoraConfig(r=2))
    randomize_adapter_(m, seed=5)
    m.eval()
    names = ["a", "mx1", "c", "mx2", "d", None]
    jobs = [(i, n) for i in range(len(PROMPTS)) for n in names]
    refs = [_offline(m, PROMPTS[i], n) for i, n in jobs]
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_adapters_per_step=4, max_mixlora_per_step=1,
                 max_pending=64)
    mixes, tables, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            with eng._lock:
                mixes.append(sum(1 for a, k in eng._inside.items() if a is not None and k > 0 and a.startswith("mx")))
            tables.append(list(eng._positions))
            time.sleep(0.001)

    w = threading.Thread(target=watch)
    w.start()
    try:
        for n in names[:-1]:  # all resident first: the submits below need no change of the model
            eng.generate(PROMPTS[0], n, max_new_tokens=1)
        with eng._model_lock:  # no step until all are queued: admission fills CB up to its caps at once
            rids = [eng.submit(PROMPTS[i], n) for i, n in jobs]
        outs = [list(eng.stream(r)) for r in rids]
        assert outs == refs
        assert eng.mixed_steps > 0 and max(mixes) == 1
        st = eng._state()
        mix_slots = {n for n, info in st.adapters.items() if info.config.method == "mixlora"}
        assert any(t and t[0] in mix_slots for t in tables)
        for t in tables:
            assert all(n not in mix_slots for n in t[1:]) and (not t or t[0] is None or t[0] in mix_slots)
        ffns = [mod for mod in m.modules() if isinstance(mod, AdaptedFFN) and isinstance(
            (mod.batch_stacks or (None, None, None))[2], dict)]
        assert ffns
        for mod in ffns:
            stacks = mod.batch_stacks[2]
            assert stacks["router"].shape[0] == stacks["emax"] == 4  # one position of the largest expert count
            assert all(a.shape[0] == 4 + 1 for a in stacks["A"].values())
            assert stacks["E"].shape[0] == len(mod.batch_stacks[0])  # every position (and the base) has a count
        # what warm-up reports as the stacks' size: each storage once
        from moelora.layers.adapted import stacked_adapter_bytes

        expert = sum(t.untyped_storage().nbytes() for mod in ffns for t in (
            mod.batch_stacks[2]["router"], mod.batch_stacks[2]["E"], mod.batch_stacks[2]["k"],
            *mod.batch_stacks[2]["A"].values(), *mod.batch_stacks[2]["B"].values()))
        assert stacked_adapter_bytes(m) > expert > 0
    finally:
        stop.set()
        w.join()
        eng.close()


def test_a_mixlora_adapter_out_of_its_region_is_refused_by_the_stacks():
    """The FFN's expert stacks trust ``StackBounds.mixlora_positions``; a plan that breaks it gets a
    clear error, not a wrong mixture."""
    from moelora.layers.adapted import _moe_positions
    from moelora.state import StackBounds

    b = StackBounds(rank=4, experts=4, top_k=2, expert_rank=4, mixlora_positions=1)
    assert _moe_positions(b, ["mix", None, None]) == 1 and _moe_positions(None, ["x", "y"]) == 2
    with pytest.raises(ValueError, match="positions \\[2\\].*first 1 positions"):
        _moe_positions(b, ["mix", None, "late"])


def test_a_request_waiting_for_a_swap_holds_nobody_back():
    """A request whose adapter must be swapped in waits for the admission thread's install pass
    (it needs the model lock); requests behind it whose adapters are resident enter meanwhile,
    however many (before: max_bypass of them, then the whole queue waited for the swap), while
    its place under the per-step cap is kept; then everything equals offline generate."""
    m = _model()
    refs = {n: _offline(m, PROMPTS[0], n) for n in NAMES}
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_adapters_per_step=3, max_bypass=2,
                 max_resident_adapters=3, max_pending=32)
    try:
        for n in ("a", "c"):
            eng.generate(PROMPTS[0], n)
        assert "b" not in eng.registry.resident()  # "b" must be swapped in
        with eng._model_lock:  # no step and no swap until everything is queued
            cold = eng.submit(PROMPTS[0], "b")
            hot = [eng.submit(PROMPTS[0], "a") for _ in range(6)]
            assert eng.queued() == 1  # only "b" waits: six overtook it, max_bypass is 2
            new = eng.submit(PROMPTS[0], "c")  # a new adapter, resident: room for it and "b" under the cap
            assert eng.queued() == 1
            later = eng.submit(PROMPTS[0], "d")  # a fourth distinct adapter: the cap (b's place kept)
            assert eng.queued() == 2
        outs = {r: list(eng.stream(r)) for r in [cold, *hot, new]}
        assert outs[cold] == refs["b"] and outs[new] == refs["c"] and all(outs[r] == refs["a"] for r in hot)
        assert list(eng.stream(later)) == refs["d"]
    finally:
        eng.close()


def test_a_request_with_no_slot_for_its_swap_still_gets_fairness():
    """When the install pass finds no slot for a request's adapter (every slot pinned), the request
    is a real wait again: later requests overtake it at most ``max_bypass`` times, so it is not
    starved by traffic to resident adapters."""
    m = _model()
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_bypass=2, max_resident_adapters=1, max_pending=32)
    try:
        eng.generate(PROMPTS[0], "a")
        with eng._model_lock:
            pin = eng.submit(PROMPTS[0], "a")  # holds the only slot
            cold = eng.submit(PROMPTS[0], "b")
            eng._admit(install=True)  # no slot for "b": every slot is pinned
            assert eng._requests[cold].no_slot
            hot = [eng.submit(PROMPTS[0], "a") for _ in range(4)]
            assert eng.queued() == 1 + 4 - 2  # two overtook it (max_bypass), the rest wait behind it
        for r in [pin, cold, *hot]:
            list(eng.stream(r))
    finally:
        eng.close()
