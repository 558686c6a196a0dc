"""Host ops of a mixed packed step (issue 16): per adapted linear and per MixLoRA FFN, the number of
aten ops a packed serving step runs does not grow with the number of adapters in the batch
(the per-token slot index is built once per forward; a site runs a fixed handful of ops).
Counted with a TorchDispatchMode (what the dispatcher runs: one host launch each on a GPU)."""
from __future__ import annotations

import collections

import pytest

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moelora
from moelora.layers.adapted import AdaptedFFN, AdaptedLinear
from moelora.state import BatchPlan

from conftest import make_tiny, randomize_adapter_

N_LORA, N_MIX = 6, 6


class _SiteOps(TorchDispatchMode):
    """aten ops per innermost adapted module (AdaptedLinear / AdaptedFFN) running."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list = []
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.stack[-1] if self.stack else None] += 1
        return func(*args, **(kwargs or {}))


def _model():
    m = make_tiny()
    for i in range(N_LORA):  # ranks 2, 4, 8: the stacks pad them to the largest
        moelora.add_adapter(m, f"l{i}", moelora.LoraConfig(r=2 << (i % 3)), trainable=False)
    for i in range(N_MIX):
        moelora.add_adapter(m, f"m{i}", moelora.MixLoraConfig(num_experts=4, top_k=2, r=4), trainable=False)
    randomize_adapter_(m, seed=5)
    return m.eval()


def _count(m, names, token_slots):
    """Ops per site kind of one packed forward (a warm one: the stacks of this composition built)."""
    c = _SiteOps()
    hooks = []
    for mod in m.modules():
        if isinstance(mod, (AdaptedLinear, AdaptedFFN)):
            kind = "linear" if isinstance(mod, AdaptedLinear) else "ffn"
            hooks.append(mod.register_forward_pre_hook(lambda mod, a, k=kind: c.stack.append((k, id(mod))) and None))
            hooks.append(mod.register_forward_hook(lambda mod, a, o: c.stack.pop() and None))
    ids = torch.arange(3, 3 + token_slots.numel()).view(1, -1)
    plan = BatchPlan.per_token(names, token_slots)
    try:
        with torch.no_grad():
            ref = m(ids, adapter_names=plan).logits
            with c:
                out = m(ids, adapter_names=plan).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, ref)
    per = collections.defaultdict(list)
    for key, n in c.ops.items():
        if key is not None:
            per[key[0]].append(n)
    return {k: max(v) for k, v in per.items()}


def test_site_ops_do_not_grow_with_adapters_in_the_batch():
    m = _model()
    counts = {}
    for n in (2, 6):
        # n LoRA and n MixLoRA adapters in the batch, 3 tokens each, plus base tokens
        names = tuple(f"l{i}" for i in range(n)) + tuple(f"m{i}" for i in range(n)) + (None,)
        slots = torch.tensor([s for s in range(len(names)) for _ in range(3)])
        counts[n] = _count(m, names, slots)
    assert counts[2]["linear"] == counts[6]["linear"], counts
    assert counts[2]["ffn"] == counts[6]["ffn"], counts


def test_site_ops_do_not_grow_with_resident_positions():
    """The engine's plans list every stack position (resident slots), most with no token in the
    step: those cost a site nothing."""
    m = _model()
    names = tuple(f"l{i}" for i in range(N_LORA)) + tuple(f"m{i}" for i in range(N_MIX)) + (None,)
    few = torch.tensor([0, 0, 1, N_LORA, N_LORA, len(names) - 1])
    many = torch.tensor([s for s in range(len(names)) for _ in range(2)])[:-6]
    a, b = _count(m, names, few), _count(m, names, many)
    assert a == b, (a, b)


def test_lazy_mixture_records_equal_the_eager_loop():
    """The mixed inference mixture's routing records (made on first read) equal the per-adapter
    loop's (``dispatch.eager_routing_records()``), exactly, and deepcopy to plain values."""
    import copy

    from moelora.layers import adapted
    from moelora.layers.dispatch import eager_routing_records

    m = _model()
    names = ("m0", "l1", "m3", None)
    slots = torch.tensor([0, 0, 1, 2, 2, 2, 3, 0])
    plan = BatchPlan.per_token(names, slots)
    ids = torch.arange(3, 11).view(1, -1)
    got = {}
    for lazy in (False, True):
        with eager_routing_records(not lazy), torch.no_grad():
            m(ids, adapter_names=plan)
        recs = m.moelora_state.records
        assert sorted(recs) == ["m0", "m3"]
        got[lazy] = ({n: {k: (tuple(r.routing), r.token_mask, r.num_experts) for k, r in recs[n].items()}
                      for n in recs}, {n: moelora.router_statistics(m, n) for n in recs})
        if lazy:
            assert isinstance(recs["m0"][0], adapted._MixtureRecord)
            copied = copy.deepcopy(recs["m0"][0])
            assert torch.equal(copied.routing.experts, recs["m0"][0].routing.experts)
    (ra, sa), (rb, sb) = got[False], got[True]
    for n in ra:
        assert ra[n].keys() == rb[n].keys()
        for k in ra[n]:
            (ta, ma, ea), (tb, mb, eb) = ra[n][k], rb[n][k]
            assert ea == eb and torch.equal(ma, mb)
            for x, y in zip(ta, tb):
                assert (x is None and y is None) or torch.equal(x, y)
        for x, y in zip(sa[n], sb[n]):
            for key in x:
                assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


def _clear_stacks(m) -> None:
    for mod in m.modules():
        if hasattr(mod, "batch_stacks"):
            mod.batch_stacks = None
            mod.__dict__.pop("_slots_memo", None)


def _stacks_of(m) -> dict:
    return {id(mod): mod.batch_stacks[2] for mod in m.modules() if getattr(mod, "batch_stacks", None) is not None}


@pytest.mark.parametrize("change", ["lora_smaller_rank", "mixlora_fewer_experts", "free_position", "refill",
                                    "lora_larger_rank"])
def test_a_changed_position_rewrites_its_rows_in_place_and_equals_a_fresh_build(change):
    """The serving engine's swap: one stack position gets another adapter (or is freed, or its
    slot's tensors are copied over). The next forward rewrites only that position's rows in the
    cached stacks (same tensors: no rebuild of every position) and equals a forward whose stacks
    are built afresh; an adapter that does not fit the stacks (a larger rank) makes new ones."""
    m = _model()
    moelora.add_adapter(m, "l_small", moelora.LoraConfig(r=2), trainable=False)
    moelora.add_adapter(m, "l_big", moelora.LoraConfig(r=16), trainable=False)
    moelora.add_adapter(m, "m_few", moelora.MixLoraConfig(num_experts=2, top_k=2, r=2), trainable=False)
    randomize_adapter_(m, seed=6)
    names = [f"l{i}" for i in range(N_LORA)] + [f"m{i}" for i in range(N_MIX)] + [None]
    slots = torch.tensor([s for s in range(len(names)) for _ in range(2)])
    ids = torch.arange(3, 3 + slots.numel()).view(1, -1)

    def fwd(epoch):
        with torch.no_grad():
            return m(ids, adapter_names=BatchPlan.per_token(tuple(names), slots, epoch=epoch)).logits

    fwd(1)
    before = _stacks_of(m)
    if change == "lora_smaller_rank":
        names[2] = "l_small"  # l2 has rank 8 (the stacks' largest), l_small 2
    elif change == "mixlora_fewer_experts":
        names[N_LORA + 1] = "m_few"
    elif change == "free_position":
        names[1] = None  # an engine position left free: its tokens go to the base
        slots = torch.where(slots == 1, len(names) - 1, slots)
    elif change == "refill":
        sd = moelora.adapter_state_dict(m, "l3")
        moelora.load_adapter_state_dict(m, {k: torch.randn_like(v) for k, v in sd.items()}, "l3")
    else:
        names[0] = "l_big"
    got = fwd(2)
    after = _stacks_of(m)
    assert after.keys() == before.keys()
    linear_ids = {id(x) for x in m.modules() if isinstance(x, AdaptedLinear)}
    same = [after[k] is before[k] for k in after if k in linear_ids]
    if change == "lora_larger_rank":
        assert not any(same)
    else:
        assert all(same)
        assert all(after[k] is before[k] for k in after)  # the FFNs' too
    _clear_stacks(m)
    fresh = fwd(3)
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-6)


def test_a_one_position_change_costs_a_few_ops_per_site():
    """After one position changes, a linear site runs that position's row copies more than a warm
    step (5 kernels; 15 ops with the views, which the dispatcher counts too), not a rebuild over
    every position (measured before this change: 51 -> 117 ops per linear at these 13 positions)."""
    m = _model()
    moelora.add_adapter(m, "l_other", moelora.LoraConfig(r=4), trainable=False)
    names = tuple(f"l{i}" for i in range(N_LORA)) + tuple(f"m{i}" for i in range(N_MIX)) + (None,)
    slots = torch.tensor([s for s in range(len(names)) for _ in range(2)])
    warm = _count(m, names, slots)
    changed = ("l_other",) + names[1:]
    c = _SiteOps()
    hooks = [mod.register_forward_pre_hook(lambda mod, a: c.stack.append(id(mod)) and None)
             for mod in m.modules() if isinstance(mod, AdaptedLinear)]
    hooks += [mod.register_forward_hook(lambda mod, a, o: c.stack.pop() and None)
              for mod in m.modules() if isinstance(mod, AdaptedLinear)]
    try:
        with torch.no_grad(), c:
            m(torch.arange(3, 3 + slots.numel()).view(1, -1), adapter_names=BatchPlan.per_token(changed, slots))
    finally:
        for h in hooks:
            h.remove()
    per_linear = max(n for k, n in c.ops.items() if k is not None)
    assert per_linear <= warm["linear"] + 16, (per_linear, warm)


def test_change_log_says_what_changed_since_an_epoch():
    from moelora.state import ChangeLog

    log = ChangeLog(keep=3)
    e0 = log.epoch
    assert log.since(e0) == (frozenset(), frozenset())
    e1 = log.record("a", structural=False)
    log.record("b", structural=True)
    assert e1 > e0 and log.since(e0) == (frozenset({"a"}), frozenset({"b"}))
    assert log.since(e1) == (frozenset(), frozenset({"b"}))
    other = ChangeLog()  # epochs are unique across logs: a later log's start is after e1
    assert other.epoch > e1
    for n in "cde":
        log.record(n, structural=False)
    assert log.since(e0) is None and log.since(e1) is None  # older than what the log keeps: unknown
    assert log.since(None) is None


@pytest.mark.parametrize("change", ["write", "replace_module"])
def test_an_epoch_plan_sees_the_changes_its_log_names(change):
    """Plans with an epoch and the maker's ChangeLog (the serving engine's): a site re-checks only
    the positions the log names; a slot written in place, or dropped and added again under the same
    name with another config, is seen by the next forward (equal to a fresh build), and the sites'
    slot lookups are reused when no slot of the composition was added or dropped."""
    from moelora.state import ChangeLog

    m = _model()
    log = ChangeLog()
    names = ("l0", "l1", "m0", "m1", None)
    slots = torch.tensor([0, 0, 1, 2, 2, 3, 4])
    ids = torch.arange(3, 3 + slots.numel()).view(1, -1)

    def fwd():
        with torch.no_grad():
            return m(ids, adapter_names=BatchPlan.per_token(names, slots, epoch=log.epoch, changes=log)).logits

    fwd()
    memo = {id(x): x.__dict__["_slots_memo"][2] for x in m.modules() if "_slots_memo" in x.__dict__}
    log.record("unrelated", structural=True)  # a slot outside the composition
    fwd()
    assert all(x.__dict__["_slots_memo"][2] is memo[id(x)] for x in m.modules() if id(x) in memo)
    if change == "write":
        log.record("l1", structural=False)
        sd = moelora.adapter_state_dict(m, "l1")
        moelora.load_adapter_state_dict(m, {k: torch.randn_like(v) for k, v in sd.items()}, "l1")
    else:
        log.record("m1", structural=True)
        moelora.delete_adapter(m, "m1")
        log.record("m1", structural=True)
        moelora.add_adapter(m, "m1", moelora.MixLoraConfig(num_experts=2, top_k=2, r=2), trainable=False)
        sd = moelora.adapter_state_dict(m, "m1")  # the new m1 only: the log names no other change
        moelora.load_adapter_state_dict(m, {k: torch.randn_like(v) * 0.3 for k, v in sd.items()}, "m1")
    got = fwd()
    _clear_stacks(m)
    fresh = fwd()
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-6)
