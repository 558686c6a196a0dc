"""Operations on one adapter do not walk the others' modules (issue 16: swap cost at many slots).

A served model holds tens of resident adapters; add/delete/load of one of them used to snapshot
and traverse every module of every adapter (O(adapters x sites) host time per swap)."""
import pytest
import torch

import moelora
from moelora import inject
from conftest import make_tiny, randomize_adapter_

CFGS = {
    "lora": moelora.LoraConfig(r=4, lora_dropout=0.0),
    "mix": moelora.MixLoraConfig(num_experts=3, top_k=2, r=2, lora_dropout=0.1),
    "sw": moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=3, lora_dropout=0.0, switch_mode="unmerged"),
}


def _model(n_extra: int):
    model = make_tiny("llama", seed=0)
    moelora.inject_adapter(model, CFGS["lora"], adapter_name="a0")
    for i in range(n_extra):
        moelora.add_adapter(model, f"x{i}", CFGS[("lora", "mix", "sw")[i % 3]])
    randomize_adapter_(model, seed=1, scale=0.3)
    return model


def _old_adapter_parameters(model, name):  # the full walk it replaced: the reference
    out = {}
    for k, p in model.named_parameters():
        c = inject.canonical_key(k, name)
        if c is not None:
            out[c] = p
    return out


def test_adapter_parameters_equal_the_full_walk_in_order():
    model = _model(6)
    for name in ["a0", "x0", "x1", "x2", "x5"]:
        fast, ref = inject._adapter_parameters(model, name), _old_adapter_parameters(model, name)
        assert list(fast) == list(ref) and len(ref) > 0
        assert all(fast[k] is ref[k] for k in ref)


def test_the_snapshot_does_not_grow_with_the_other_adapters():
    small, large = _model(1), _model(7)
    n_small, n_large = len(inject._Snapshot(small).objects), len(inject._Snapshot(large).objects)
    n_all = sum(1 for _ in large.modules())
    # the sites' containers are the same; only the new sites (MixLoRA's FFN, LoRA-Switch's routers) differ
    assert n_large < 0.5 * n_all, (n_large, n_all)
    walked = {id(m) for _, m in inject._walk(large)}
    for m in large.modules():
        if isinstance(m, inject._SITES):
            assert id(m) in walked and id(m.adapters) in walked
            assert not any(id(root) in walked for root in m.adapters.values())
    assert n_large - n_small < 0.2 * n_all


def test_walk_into_an_adapter_yields_named_modules_order():
    model = _model(4)
    ref = [(n, m) for n, m in model.named_modules() if ".adapters." not in n or ".adapters.x1" in n
           and ".adapters." not in n.split(".adapters.x1", 1)[1]]
    got = list(inject._walk(model, into=("x1",)))
    assert [n for n, _ in got] == [n for n, _ in ref]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_add_adapter_sets_the_mode_of_its_own_modules_only(mode):
    model = _model(3)
    getattr(model, mode)()
    other = model.model.layers[0].self_attn.q_proj.adapters["x0"].lora_dropout
    other.training = not model.training  # a flag of another adapter that add must not touch
    moelora.add_adapter(model, "new", CFGS["mix"])
    assert other.training is (not model.training)
    for n, m in model.named_modules():
        if ".adapters.new" in n or isinstance(m, inject._SITES):
            assert m.training is model.training, n


def test_swap_cycle_leaves_every_other_adapter_bit_identical():
    model = _model(5).eval()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    sd = {k: v.clone() for k, v in moelora.adapter_state_dict(model, "x1").items()}
    moelora.delete_adapter(model, "x1")
    moelora.add_adapter(model, "x1", CFGS["mix"], trainable=False)
    moelora.load_adapter_state_dict(model, sd, "x1")
    after = model.state_dict()
    assert set(after) == set(before)
    for n, t in before.items():
        assert torch.equal(after[n], t), n
    assert all(not p.requires_grad for p in inject._adapter_parameters(model, "x1").values())


def test_public_adapter_parameters_are_the_live_trainable_ones():
    model = _model(3)
    got = moelora.adapter_parameters(model, "x1")
    ref = [p for n, p in model.named_parameters() if ".adapters.x1." in n]
    assert [id(p) for p in got.values()] == [id(p) for p in ref]
    assert list(got) == list(moelora.adapter_state_dict(model, "x1"))
    assert all(p.requires_grad for p in got.values())
    with pytest.raises(KeyError):
        moelora.adapter_parameters(model, "nope")
