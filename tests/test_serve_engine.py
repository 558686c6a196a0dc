"""moelora.serve.Engine: every response equals offline greedy ``model.generate`` with that adapter
alone, token-exact (CPU, fp32), also when requests to different adapters run concurrently in
one continuous batch; cancel / load / unload / errors; the CB internals we rely on."""
from __future__ import annotations

import threading

import pytest
import torch

import moelora
from moelora.serve import Engine, PromptTooLongError, QueueFullError, UnknownAdapterError
from moelora.serve import _cb_private

from conftest import make_tiny, randomize_adapter_

NEW = 10


def test_cb_private_internals():
    missing = _cb_private.check_internals()
    assert not missing, ("transformers' continuous-batching internals that moelora/serve/_cb_private.py uses moved "
                         f"(tested range {_cb_private.TESTED}): {missing}")


def _model():
    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "lora8", moelora.LoraConfig(r=8, target_modules=("q_proj", "v_proj", "down_proj")))
    randomize_adapter_(m, seed=3)
    return m.eval()


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 3, 3], [20, 21], [5, 9, 13, 17, 2, 30],
           [40, 41, 42, 43], [8]]
NAMES = ["lora", "mix", None, "lora8", "mix", "lora", None, "lora8"]


def _offline(m, prompt, name, new=NEW):
    out = m.generate(torch.tensor([prompt]), adapter_names=[name], max_new_tokens=new, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def served():
    m = _model()
    refs = [_offline(m, p, n) for p, n in zip(PROMPTS, NAMES)]
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_pending=len(PROMPTS) + 2)
    yield m, eng, refs
    eng.close()


def test_sequential_equals_offline(served):
    m, eng, refs = served
    for p, n, ref in zip(PROMPTS, NAMES, refs):
        assert eng.generate(p, n) == ref, n


def test_concurrent_mixed_batch_equals_offline(served):
    m, eng, refs = served
    before = eng.mixed_steps
    rids = [eng.submit(p, n) for p, n in zip(PROMPTS, NAMES)]  # all queued at once: packed together
    outs = [list(eng.stream(r)) for r in rids]
    assert outs == refs
    assert eng.mixed_steps > before  # the batches really mixed adapters

    results = {}

    def client(i):
        results[i] = eng.generate(PROMPTS[i], NAMES[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(PROMPTS))] == refs


def test_errors_and_cancel(served):
    m, eng, refs = served
    with pytest.raises(UnknownAdapterError) as e:
        eng.submit([1, 2], "nope")
    assert "lora" in str(e.value) and "base" in e.value.available
    with pytest.raises(PromptTooLongError):
        eng.submit(list(range(1, 50)) * 3, None)
    rid = eng.submit(PROMPTS[0], "lora", max_new_tokens=100)
    eng.cancel(rid)
    assert len(list(eng.stream(rid))) < 100
    assert eng.generate(PROMPTS[1], "mix") == refs[1]  # still serving
    assert eng.generate(PROMPTS[2], "base") == refs[2]  # the base model's name


def test_queue_full():
    m = _model()
    eng = Engine(m, max_new_tokens=4, eos_token_id=-1, max_pending=2)
    try:
        eng.generate([1, 2, 3], "lora")  # resident now: the submits below need no change of the model
        eng.generate([1, 2, 3], "mix")
        with eng._model_lock:  # hold the generation loop so requests stay in flight
            eng.submit([1, 2, 3], "lora")
            eng.submit([1, 2, 3], "mix")
            with pytest.raises(QueueFullError):
                eng.submit([1, 2, 3], None)
    finally:
        eng.close()


def test_load_unload_and_adapters_dir(tmp_path):
    m = _model()
    refs = {n: _offline(m, PROMPTS[0], n) for n in ("lora", "mix")}
    for n in ("lora", "mix"):
        moelora.save_adapter(m, tmp_path / "dir" / n, adapter_name=n)
    other = make_tiny(hidden=32, inter=40)  # another base: its adapter must not load
    moelora.inject_adapter(other, moelora.LoraConfig(r=4))
    moelora.save_adapter(other, tmp_path / "dir" / "wrongbase")
    eng = Engine(make_tiny(), adapters_dir=tmp_path / "dir", max_new_tokens=NEW, eos_token_id=-1)
    try:
        assert sorted(eng.adapter_names()) == ["lora", "mix"]
        assert "wrongbase" in eng.load_errors
        assert eng.generate(PROMPTS[0], "lora") == refs["lora"]
        assert eng.generate(PROMPTS[0], "mix") == refs["mix"]
        eng.unload_adapter("mix")
        with pytest.raises(UnknownAdapterError):
            eng.submit(PROMPTS[0], "mix")
        eng.load_adapter("mix2", tmp_path / "dir" / "mix")
        assert eng.generate(PROMPTS[0], "mix2") == refs["mix"]
        assert eng.generate(PROMPTS[0], "lora") == refs["lora"]
    finally:
        eng.close()


def test_lora_switch_and_chunked_prefill():
    """A LoRA-Switch adapter beside LoRA/MixLoRA ones, and a batch budget so small that prompts are
    prefilled in chunks packed with other requests' decode tokens: still token-exact."""
    m = make_tiny()
    moelora.inject_adapter(m, moelora.LoraConfig(r=4), adapter_name="lora")
    moelora.add_adapter(m, "mix", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.add_adapter(m, "switch", moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=4))
    randomize_adapter_(m, seed=4)
    m.eval()
    prompts = [list(range(1, 30)), [7, 8, 9], list(range(30, 55)), [3, 3, 3, 4], list(range(5, 25))]
    names = ["switch", "mix", "lora", "switch", None]
    refs = [_offline(m, p, n) for p, n in zip(prompts, names)]
    eng = Engine(m, max_new_tokens=NEW, eos_token_id=-1, max_batch_tokens=16)
    try:
        rids = [eng.submit(p, n) for p, n in zip(prompts, names)]
        assert [list(eng.stream(r)) for r in rids] == refs
        assert eng.mixed_steps > 0
        assert [eng.generate(p, n) for p, n in zip(prompts, names)] == refs  # one at a time (merged decode off)
    finally:
        eng.close()


def test_a_failing_step_fails_its_requests_only(served):
    """An error inside one packed step (here an injected CUDA out-of-memory) fails the requests of
    that step with a clear error; the engine goes on and the next requests equal offline."""
    m, eng, refs = served
    fail = {"left": 1}

    def inject(module, args):
        if fail["left"]:
            fail["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = m.register_forward_pre_hook(inject)
    try:
        rids = [eng.submit(p, n) for p, n in zip(PROMPTS[:3], NAMES[:3])]
        failed = 0
        for rid, ref in zip(rids, refs[:3]):
            try:
                assert list(eng.stream(rid)) == ref  # a request of a later step
            except Exception as e:  # noqa: BLE001
                assert "packed step" in str(e) and "out of memory (injected)" in str(e) and "goes on" in str(e), e
                failed += 1
        assert failed >= 1 and fail["left"] == 0
    finally:
        handle.remove()
    assert eng.healthy() and eng.pending() == 0
    assert [eng.generate(p, n) for p, n in zip(PROMPTS[:3], NAMES[:3])] == refs[:3]


def test_cancel_frees_only_requests_with_blocks(served):
    """Cancelling requests that CB has not scheduled yet (no KV blocks) makes CB free nothing for
    them (transformers 5.17 logged "attempted to free blocks for non-existent request_id" for each,
    after every timeout of the first H200 run); the one that had blocks is freed."""
    import logging

    m, eng, refs = served
    bp = eng._manager.batch_processor
    unknown, freed = [], []
    for alloc in _cb_private._allocators(bp.cache):
        def spy(rid, *a, _orig=alloc.free_blocks, _alloc=alloc, **k):
            (freed if rid in _alloc.block_table else unknown).append(rid)
            return _orig(rid, *a, **k)
        alloc.free_blocks = spy
    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    cb_log = logging.getLogger("ContinuousBatchingLogger")
    catch = Catch()
    cb_log.addHandler(catch)
    try:
        first = eng.submit(PROMPTS[0], "lora", max_new_tokens=40)
        next(iter(eng.stream(first)))  # it has blocks and the loop is stepping
        with eng._model_lock:  # the loop waits inside a step: the next ones are not scheduled yet
            later = [eng.submit(p, n, max_new_tokens=40) for p, n in zip(PROMPTS[1:4], NAMES[1:4])]
            for rid in [first] + later:
                eng.cancel(rid)
        from moelora.serve.engine import wait_until

        assert wait_until(lambda: not bp.scheduler.active_requests and not bp.scheduler.waiting_requests, 20)
        assert eng.generate(PROMPTS[4], NAMES[4]) == refs[4]  # the loop went on past the cancellations
    finally:
        cb_log.removeHandler(catch)
        for alloc in _cb_private._allocators(bp.cache):
            alloc.__dict__.pop("free_blocks", None)
    assert unknown == [] and first in freed
    assert not [w for w in warnings if "non-existent" in w], warnings


def _count_stack_builds(monkeypatch):
    """Counts the per-site stack builds of moelora.layers.adapted (``_stacked_lora`` / ``_moe_stacks``
    go through its module-level ``_cached_per_site``), per site and composition; in-place row
    updates of a few changed positions are not builds."""
    from moelora.layers import adapted

    builds = []
    orig = adapted._cached_per_site

    def counted(site, names, tensors, build, update=None):
        def b():
            builds.append((id(site), names))
            return build()
        return orig(site, names, tensors, b, update)

    monkeypatch.setattr(adapted, "_cached_per_site", counted)
    return builds


def test_stacks_not_rebuilt_between_steps_with_the_same_resident_set(served, monkeypatch):
    """The plan of a mixed packed step names the engine's stack positions (fixed while the resident
    set holds), not the step's adapters in order of appearance: two consecutive steps with other
    requests, orders and adapters reuse every site's stacks (0 builds in the 2nd), and each token's
    index is its own adapter's position. Before: slot_names followed the step's order, so the 2nd
    step rebuilt the stacks of every adapted linear and FFN."""
    m, eng, refs = served
    for n in ("lora", "mix", "lora8"):
        eng.generate(PROMPTS[0], n, max_new_tokens=1)  # resident (no request in flight now)
    slot = {n: eng.registry._slot_of(n).model_name for n in ("lora", "mix", "lora8")}
    builds = _count_stack_builds(monkeypatch)
    for mod in eng.model.modules():  # earlier tests may have left this composition built
        if hasattr(mod, "batch_stacks"):
            mod.batch_stacks = None
    fake = {"f0": slot["lora"], "f1": slot["mix"], "f2": None, "f3": slot["lora8"]}
    with eng._model_lock:  # no step of the engine meanwhile
        with eng._lock:
            eng._adapter_of.update(fake)
        try:
            steps = [[("f0", 3), ("f1", 2), ("f2", 1)], [("f2", 2), ("f1", 1), ("f3", 2), ("f0", 1)],
                     [("f3", 1), ("f0", 4)]]
            plans = [eng._plan_for(layout, sum(q for _, q in layout)) for layout in steps]
            counts = []
            for layout, plan in zip(steps, plans):
                want = [fake[r] for r, q in layout for _ in range(q)]
                assert [plan.slot_names[i] for i in plan.row_slots.tolist()] == want
                before = len(builds)
                with torch.no_grad():
                    m(torch.arange(1, len(want) + 1)[None], adapter_names=plan)
                counts.append(len(builds) - before)
        finally:
            with eng._lock:
                for r in fake:
                    eng._adapter_of.pop(r, None)
    assert plans[0].slot_names == plans[1].slot_names == plans[2].slot_names
    assert counts[0] > 0 and counts[1] == 0 and counts[2] == 0, counts


def test_concurrent_steps_reuse_stacks_and_equal_offline(served, monkeypatch):
    """Many mixed packed steps (requests of 3 adapters and the base arriving and finishing at
    different steps): the responses equal generate alone, and each site builds its stacks at most
    once per stack composition (the resident set does not change here, so compositions only grow
    as adapters first appear), not once per step."""
    m, eng, refs = served
    builds = _count_stack_builds(monkeypatch)
    steps0 = eng.mixed_steps
    lens = [4, 10, 6, 8, 3, 10, 5, 7]
    rids = [eng.submit(p, n, max_new_tokens=k) for p, n, k in zip(PROMPTS, NAMES, lens)]
    outs = [list(eng.stream(r)) for r in rids]
    assert outs == [r[:k] for r, k in zip(refs, lens)]
    mixed = eng.mixed_steps - steps0
    assert mixed >= 4
    per_site: dict = {}
    for site, names in builds:
        per_site.setdefault(site, []).append(names)
    for names in per_site.values():  # none at all when an earlier test left the same composition built
        assert len(names) == len(set(names)), names  # never the same composition twice
        assert len(names) <= 3, names
