"""Many adapters of mixed methods over one base, chosen per sequence (issue 14)."""
import copy
import warnings

import pytest
import torch

import moelora
from conftest import make_tiny, randomize_adapter_

NAMES = ["lora4", "mix", "sw", "lora8", None]


def _configs():
    return {
        "lora4": moelora.LoraConfig(r=4, lora_dropout=0.0),
        "mix": moelora.MixLoraConfig(num_experts=3, top_k=2, r=2, lora_dropout=0.0, router_aux_loss_coef=0.1),
        "sw": moelora.LoraSwitchConfig(num_experts=4, top_k=2, r=3, lora_dropout=0.0, switch_mode="unmerged"),
        "lora8": moelora.LoraConfig(r=8, lora_alpha=4, lora_dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj")),
    }


def _model(arch="llama", seed=0, names=("lora4", "mix", "sw", "lora8")):
    model = make_tiny(arch, seed=seed)
    cfgs = _configs()
    moelora.inject_adapter(model, cfgs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        moelora.add_adapter(model, n, cfgs[n])
    randomize_adapter_(model, seed=seed + 1, scale=0.3)
    return model.eval()


def _left_padded(b=5, t=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i, pad in enumerate([0, 2, 1, 3, 0][:b]):
        mask[i, :pad] = 0
        ids[i, :pad] = 0
    return ids, mask


def _alone(model, ids, mask, names):
    """Each row run on its own with only its adapter active (None: the base)."""
    rows = []
    for i, n in enumerate(names):
        with moelora.use_adapter(model, n):
            rows.append(model(ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mixed_batch_equals_each_row_alone(arch):
    model = _model(arch)
    ids, mask = _left_padded()
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, adapter_names=NAMES).logits
        alone = _alone(model, ids, mask, NAMES)
        with moelora.disable_adapter(model):
            base = model(ids[4:], attention_mask=mask[4:]).logits
    real = mask.bool()
    torch.testing.assert_close(mixed[real], alone[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[4][real[4]], base[0][real[4]], atol=1e-5, rtol=1e-5)  # None = the base
    for i in range(4):  # every adapter changes its rows
        assert not torch.allclose(mixed[i][real[i]], model(ids[i:i + 1], attention_mask=mask[i:i + 1],
                                                             adapter_names=[None]).logits[0][real[i]], atol=1e-3)


def test_mixed_generate_gives_each_rows_own_tokens():
    model = _model()
    ids, mask = _left_padded()
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(ids, attention_mask=mask, adapter_names=NAMES, **kw)
        for i, n in enumerate(NAMES):
            with moelora.use_adapter(model, n):
                alone = model.generate(ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
            assert torch.equal(mixed[i], alone[0]), f"row {i} ({n})"
    # the names held for that generate call only
    assert model.moelora_state.generation_names is None


def test_lora_fast_path_equals_the_eager_loop_and_the_triton_kernel():
    """Plain LoRA adapters of different ranks in one batch: the stacked gathered kernel (inference)
    equals the eager loop over adapters (taken with grad enabled), also through the Triton kernel."""
    model = _model(names=("lora4", "lora8"))
    moelora.add_adapter(model, "lora2", moelora.LoraConfig(r=2, lora_dropout=0.0))
    randomize_adapter_(model, seed=9)
    ids, mask = _left_padded()
    names = ["lora8", "lora2", None, "lora4", "lora8"]
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, adapter_names=names).logits
    loop = model(ids, attention_mask=mask, adapter_names=names).logits.detach()  # grad on: the loop
    torch.testing.assert_close(fast, loop, atol=1e-5, rtol=1e-5)
    from moelora_kernels import backend

    if backend.interpreted():
        with torch.no_grad(), moelora.kernel_backend("triton"):
            kern = model(ids, attention_mask=mask, adapter_names=names).logits
        torch.testing.assert_close(kern, loop, atol=1e-4, rtol=1e-4)


def _through_the_segment_kernel(model, names, monkeypatch):
    """(eager loop logits, Triton logits, the expert counts ``segments`` was called with, mask)
    of one 5 x 14 left-padded mixed batch (70 tokens: above the segment path's threshold)."""
    from moelora_kernels import backend
    from moelora_kernels import gathered_lora as gl

    if not backend.interpreted():
        pytest.skip("the Triton kernels run here through the interpreter (CPU)")
    randomize_adapter_(model, seed=11, scale=0.3)
    model.eval()
    ids, mask = _left_padded(t=14)
    loop = model(ids, attention_mask=mask, adapter_names=names).logits.detach()  # grad on: the loop
    calls = []
    real_segments = gl.segments
    monkeypatch.setattr(gl, "segments", lambda *a: calls.append(a[1]) or real_segments(*a))
    with torch.no_grad(), moelora.kernel_backend("triton"):
        kern = model(ids, attention_mask=mask, adapter_names=names).logits
    return loop, kern, calls, mask.bool()


def test_wide_stacks_take_the_segment_kernel_sorted_once_per_forward(monkeypatch):
    """Ranks padded to 64 over 5 slots are too wide for the all-experts tile: the 70 tokens of
    a mixed batch take the gathered kernel's "segment" path (the serving prefill's), equal to the
    eager loop, and its slot order is sorted once per forward for all linears (``BatchPlan.memo``)."""
    from moelora_kernels import gathered_lora as gl

    model = make_tiny("llama")
    moelora.inject_adapter(model, moelora.LoraConfig(r=40, lora_dropout=0.0), adapter_name="a")
    for n, r in (("b", 33), ("c", 48), ("d", 36)):
        moelora.add_adapter(model, n, moelora.LoraConfig(r=r, lora_dropout=0.0))
    loop, kern, calls, _ = _through_the_segment_kernel(model, ["a", "b", None, "c", "d"], monkeypatch)
    torch.testing.assert_close(kern, loop, atol=1e-4, rtol=1e-4)
    assert calls == [5] and gl.path_for(70, 5, 48) == "segment"


def test_wide_virtual_experts_take_the_segment_kernel_sorted_once_per_ffn(monkeypatch):
    """Three MixLoRA adapters of 4 experts at rank 20 (padded to 32) over a batch's 4 slots are 17
    virtual experts, too wide for the all-experts tile: the 70 tokens' gate, up and down deltas
    take the "segment" path, equal to the loop over adapters, with the slot order sorted once per FFN."""
    from moelora_kernels import gathered_lora as gl

    model = make_tiny("llama")
    cfg = moelora.MixLoraConfig(num_experts=4, top_k=2, r=20, lora_dropout=0.0)
    moelora.inject_adapter(model, cfg, adapter_name="m0")
    for n in ("m1", "m2"):
        moelora.add_adapter(model, n, cfg)
    loop, kern, calls, real = _through_the_segment_kernel(model, ["m0", "m1", None, "m2", "m0"], monkeypatch)
    torch.testing.assert_close(kern[real], loop[real], atol=1e-4, rtol=1e-4)
    # one sort per FFN (gate, up and down share it) over the stack's virtual experts (a row of E
    # experts per slot of the batch and the zero expert: 4 * 4 + 1)
    assert calls == [17] * model.config.num_hidden_layers and gl.path_for(70, 17, 20) == "segment"


def test_unknown_or_miscounted_adapter_names_are_clear_errors():
    model = _model(names=("lora4", "mix"))
    ids, mask = _left_padded(b=2)
    with pytest.raises(KeyError, match="unknown adapter 'nope'.*lora4"):
        model(ids, attention_mask=mask, adapter_names=["nope", None])
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        model(ids, attention_mask=mask, adapter_names=["mix", None, "lora4"])
    with pytest.raises(KeyError, match="unknown adapter"):
        model.generate(ids, attention_mask=mask, adapter_names=["x", None], max_new_tokens=2)
    model(ids, attention_mask=mask, adapter_names=["mix", None])  # still works after the errors


def test_per_adapter_aux_loss_and_router_statistics():
    model = _model()
    model.train()
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels, adapter_names=NAMES)
    assert set(out.aux_losses) == {"mix", "sw"}
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    st = moelora.router_statistics(model, "mix")
    assert len(st) == 2 and all(float(s["tokens"]) == float(mask[1].sum()) for s in st)  # row 1's real tokens
    sw = moelora.router_statistics(model, "sw")
    assert len(sw) == 1 and float(sw[0]["tokens"]) == float(mask[2].sum())
    # the mixed batch's aux loss of "mix" is the one of its row alone
    with moelora.use_adapter(model, "mix"):
        alone = model(ids[1:2], attention_mask=mask[1:2], labels=labels[1:2])
    torch.testing.assert_close(out.aux_losses["mix"], alone.aux_loss, atol=1e-6, rtol=1e-6)
    # return_dict=False: the tuple's loss includes the aux loss too
    with moelora.use_adapter(model, "mix"):
        as_tuple = model(ids[1:2], attention_mask=mask[1:2], labels=labels[1:2], return_dict=False)
    torch.testing.assert_close(as_tuple[0], alone.loss)
    assert alone.loss > alone.aux_loss > 0


def test_training_one_adapter_leaves_the_others_and_the_base_bit_unchanged():
    model = _model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids, mask = _left_padded()
    moelora.set_adapter(model, "mix")
    for _ in range(2):
        opt.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None]
        assert grads and all(".adapters.mix." in n for n in grads), grads[:5]
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".adapters.mix." in k for k in changed)


def test_deepcopy_is_independent():
    model = _model(names=("sw",))
    moelora.switch_state(model).mode = "merge"
    ids = torch.randint(1, 61, (1, 4))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    twin = copy.deepcopy(model)
    assert twin.moelora_state is not model.moelora_state
    assert twin.model.layers[0].self_attn.q_proj._state is twin.moelora_state
    with torch.no_grad():
        assert torch.equal(twin.generate(ids, **kw), ref)
        n = moelora.switch_state(model).merge_launches
        randomize_adapter_(twin, seed=7)
        twin_out = twin.generate(ids, **kw)
        assert moelora.switch_state(model).merge_launches == n, "the copy's generate ran the original"
        assert torch.equal(model.generate(ids, **kw), ref)
    assert not torch.equal(twin_out, ref)
    moelora.delete_adapter(twin, "sw")
    assert moelora.list_adapters(model)[0]["name"] == "sw" and moelora.adapter_state(twin) is None


def test_deepcopy_after_a_training_forward():
    """A training forward leaves routing records that are part of its autograd graph; the model
    still deep-copies, with the records' values, and the copy trains on its own."""
    model = _model(names=("mix", "lora4"))
    model.train()
    ids, mask = _left_padded(b=2)
    model(ids, attention_mask=mask, labels=ids, adapter_names=["mix", "lora4"]).loss.backward()
    twin = copy.deepcopy(model)
    stats, twin_stats = moelora.router_statistics(model), moelora.router_statistics(twin)
    assert stats and repr(stats) == repr(twin_stats)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin(ids, attention_mask=mask, labels=ids, adapter_names=["mix", "lora4"]).loss.backward()
    torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=1.0).step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_moves_and_load_state_dict_after_a_merge_plan_exist():
    """After LoRA-Switch merged decoding built its plan (and after merge_lora), .to() and
    load_state_dict must give the same tokens as the unmerged path on the new weights."""
    model = _model(names=("sw",))
    st = moelora.switch_state(model)
    st.mode = "merge"
    ids = torch.randint(1, 61, (1, 4))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)

    def both(m):
        with torch.no_grad():
            moelora.switch_state(m).mode = "merge"
            merged = m.generate(ids, **kw)
            moelora.switch_state(m).mode = "unmerged"
            unmerged = m.generate(ids, **kw)
            moelora.switch_state(m).mode = "merge"
        return merged, unmerged

    merged, unmerged = both(model)
    assert torch.equal(merged, unmerged) and st.plan is not None
    model.to(torch.float64)
    merged, unmerged = both(model)
    assert torch.equal(merged, unmerged)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float64
    # new base weights loaded in place while a plan exists: the plan must take them
    sd = {k: v + 0.05 * torch.randn_like(v) if "base_layer" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    merged, unmerged = both(model)
    assert torch.equal(merged, unmerged)
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w, sd["model.layers.1.mlp.down_proj.base_layer.weight"])


def test_merge_lora_survives_moves_and_warns_on_overwrite():
    model = _model(names=("lora4",))
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    moelora.merge_lora(model)
    model.to(torch.float64)
    moelora.unmerge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w0.double(), atol=0, rtol=0)
    moelora.merge_lora(model)
    new = {k: torch.zeros_like(v) if k.endswith("q_proj.base_layer.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(new)
    with pytest.warns(RuntimeWarning, match="overwritten in place"):
        moelora.unmerge_lora(model)
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.weight) == 0


def test_failed_load_leaves_the_model_exactly_as_it_was(tmp_path):
    model = _model(names=("lora4",))
    moelora.save_adapter(model, tmp_path / "good")
    # a shape that does not fit: another rank in the config than in the tensors
    import json

    bad = tmp_path / "bad"
    moelora.save_adapter(model, bad)
    meta = json.loads((bad / "adapter_config.json").read_text())
    meta["adapter"]["r"] = 5
    (bad / "adapter_config.json").write_text(json.dumps(meta))
    for target in (make_tiny(), _model(names=("mix",))):
        target.lm_head.weight.requires_grad_(True)  # a flag the user set: must survive
        flags = {n: p.requires_grad for n, p in target.named_parameters()}
        sd = {k: v.clone() for k, v in target.state_dict().items()}
        types = [type(m) for m in target.modules()]
        adapters = moelora.list_adapters(target)
        with pytest.raises(moelora.AdapterFileError, match="does not fit"):
            moelora.load_adapter(target, bad, adapter_name="x")
        assert {n: p.requires_grad for n, p in target.named_parameters()} == flags
        assert [type(m) for m in target.modules()] == types
        assert moelora.list_adapters(target) == adapters
        assert all(torch.equal(v, sd[k]) for k, v in target.state_dict().items())
        moelora.load_adapter(target, tmp_path / "good", adapter_name="x")  # and a good one still loads


def test_configs_are_not_mutated():
    cfg = moelora.MixLoraConfig(num_experts=3, top_k=2, r=2, attention_target_modules=["q_proj"])
    before = copy.deepcopy(cfg)
    model = moelora.inject_adapter(make_tiny(), cfg)
    assert cfg == before and cfg.base_model_type is None
    assert moelora.get_adapter_config(model).base_model_type == "llama"
    assert moelora.get_adapter_config(model) is not cfg


def test_per_forward_state_is_reset_also_for_inner_calls():
    model = _model(names=("mix", "lora4"))
    ids, mask = _left_padded(b=2)
    with torch.no_grad():
        model(ids, attention_mask=mask, adapter_names=["mix", "lora4"])
        state = model.moelora_state
        assert not state.in_forward and state.attention_mask is None and not state.plan.mixed
        # the decoder stack on its own: the active adapter, its own (unpadded) records
        moelora.set_adapter(model, "mix")
        model.model(ids)
        rec = moelora.routing_records(model, "mix")
        assert rec and all(m is None for _, _, m in rec.values()) and rec[0][0].shape[0] == ids.numel()
        # an inner MLP on its own: the active adapter, no stale mask, its own records only
        h = torch.randn(1, 3, 24)
        y = model.model.layers[1].mlp(h)
        assert y.shape == h.shape
        assert list(moelora.routing_records(model, "mix")) == [1]


def test_adapter_lifecycle_api(tmp_path):
    model = _model(names=("lora4", "mix"))
    assert [(a["name"], a["method"], a["active"], a["trainable"]) for a in moelora.list_adapters(model)] == [
        ("lora4", "lora", True, True), ("mix", "mixlora", False, True)]
    with pytest.raises(RuntimeError, match="boom"):
        with moelora.use_adapter(model, "mix"):
            assert moelora.adapter_state(model).active == "mix"
            raise RuntimeError("boom")
    assert moelora.adapter_state(model).active == "lora4"
    with pytest.raises(ValueError, match="already exists"):
        moelora.add_adapter(model, "mix", moelora.LoraConfig())
    ids, mask = _left_padded(b=2)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, adapter_names=["mix", "mix"]).logits
    moelora.save_adapter(model, tmp_path / "mix", adapter_name="mix")
    # saved alone: the same file keys as a model that only ever had this adapter
    fresh = moelora.load_adapter(make_tiny(), tmp_path / "mix")
    assert moelora.list_adapters(fresh)[0]["name"] == "default"
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, attention_mask=mask).logits, ref, atol=0, rtol=0)
    # loaded beside others, frozen
    moelora.load_adapter(model, tmp_path / "mix", adapter_name="mix2", trainable=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.mix2." in n)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, adapter_names="mix2").logits, ref, atol=0, rtol=0)
    moelora.delete_adapter(model, "mix")
    assert [a["name"] for a in moelora.list_adapters(model)] == ["lora4", "mix2"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, adapter_names="mix2").logits, ref, atol=0, rtol=0)
    moelora.delete_adapter(model, "lora4")
    assert moelora.adapter_state(model).active is None
    assert not any(".lora4." in n for n, _ in model.named_parameters())
    moelora.remove_adapter(model)
    assert type(model) is type(make_tiny()) and not hasattr(model, "moelora_state")
    assert not any(moelora.inject.is_adapter_parameter(n) for n, _ in model.named_parameters())


def test_generate_subclass_keeps_the_model_ordinary(tmp_path):
    model = _model(names=("lora4",))
    base_cls = type(make_tiny())
    assert isinstance(model, base_cls) and type(model).__name__ == base_cls.__name__
    assert "generate" not in model.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "hf")
    import json

    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [base_cls.__name__]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mixlora_virtual_experts_equal_the_loop_over_adapters(arch):
    """Several MixLoRA adapters (expert counts, top-k, ranks, expert targets differ) with LoRA and
    base rows: the one-mixture path over virtual experts (inference) equals the loop over adapters
    (taken with grad enabled) and each row alone; per-adapter statistics cover their own rows."""
    model = make_tiny(arch)
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0), adapter_name="m4")
    moelora.add_adapter(model, "m2", moelora.MixLoraConfig(num_experts=2, top_k=1, r=2, lora_dropout=0.0,
                                                           expert_target_modules=("down_proj",)))
    moelora.add_adapter(model, "m3", moelora.MixLoraConfig(num_experts=3, top_k=3, r=6, lora_alpha=3, lora_dropout=0.0))
    moelora.add_adapter(model, "l", moelora.LoraConfig(r=4, lora_dropout=0.0))
    randomize_adapter_(model, seed=4)
    model.eval()
    ids, mask = _left_padded(b=5)
    names = ["m4", "m2", None, "m3", "l"]
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, adapter_names=names).logits
        fast_stats = {n: moelora.router_statistics(model, n) for n in ("m4", "m2", "m3")}
        alone = _alone(model, ids, mask, names)
    loop = model(ids, attention_mask=mask, adapter_names=names).logits.detach()
    loop_stats = {n: moelora.router_statistics(model, n) for n in ("m4", "m2", "m3")}
    real = mask.bool()
    torch.testing.assert_close(fast[real], loop[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[real], alone[real], atol=1e-5, rtol=1e-5)
    from moelora_kernels import backend

    if backend.interpreted():  # the same through the Triton gathered kernels
        with torch.no_grad(), moelora.kernel_backend("triton"):
            kern = model(ids, attention_mask=mask, adapter_names=names).logits
        torch.testing.assert_close(kern[real], loop[real], atol=1e-4, rtol=1e-4)
    for n in fast_stats:
        assert len(fast_stats[n]) == len(loop_stats[n]) == 2
        for a, b in zip(fast_stats[n], loop_stats[n]):
            torch.testing.assert_close(a["tokens"], b["tokens"])
            torch.testing.assert_close(a["load"], b["load"], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(a["importance"], b["importance"], atol=1e-6, rtol=1e-6)


def test_routers_stay_float32_when_the_model_is_cast():
    model = _model(names=("mix", "sw"))
    model.half()
    routers = [m for m in model.modules() if isinstance(m, moelora.TopKRouter)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16
    model.to(torch.float64)  # wider than fp32: follows the model
    assert all(r.weight.dtype == torch.float64 for r in routers)
    model.to(torch.bfloat16)
    assert all(r.weight.dtype == torch.float32 for r in routers)
    with torch.no_grad():
        out = model(torch.randint(1, 61, (2, 4)), adapter_names=["mix", "sw"]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_pickle_round_trip_in_a_fresh_process(tmp_path):
    import pickle
    import subprocess
    import sys

    model = _model(names=("lora4", "mix"))
    ids = torch.randint(1, 61, (2, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, adapter_names=["mix", None], **kw)
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(model))
    torch.save({"ids": ids, "ref": ref}, tmp_path / "io.pt")
    code = ("import pickle, sys, torch; d = torch.load(sys.argv[2]); m = pickle.loads(open(sys.argv[1], 'rb').read());"
            "import moelora; out = m.generate(d['ids'], adapter_names=['mix', None], max_new_tokens=3, do_sample=False,"
            " pad_token_id=0); assert torch.equal(out, d['ref']), (out, d['ref']);"
            "assert type(m).__name__ == 'LlamaForCausalLM'; print('OK')")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pkl"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_mixed_batch_stacks_follow_a_dtype_move():
    """The stacked adapters a mixed batch builds are rebuilt after ``model.double()`` (the
    parameters keep their objects and in-place versions there, only their storage changes):
    before, the float32 stacks stayed and the float64 batch was computed at float32 precision."""
    model = _model(names=("lora4", "lora8"))
    ids, mask = _left_padded(b=2)
    names = ["lora4", "lora8"]
    with torch.no_grad():
        model(ids, attention_mask=mask, adapter_names=names)  # builds the float32 stacks
        model.double()
        mixed = model(ids, attention_mask=mask, adapter_names=names).logits
        alone = _alone(model, ids, mask, names)
    assert mixed.dtype == torch.float64
    err = (mixed - alone).abs().max().item()
    assert err < 1e-11, f"mixed batch after .double() differs from each row alone by {err:.2e}"


def test_mixed_batch_stacks_are_the_copys_own_and_stay_out_of_the_state_dict():
    """The stacked adapters an inference mixed batch caches on each site (``batch_stacks``): a
    deepcopy carries its own (changing the copy's adapters changes neither the original's stacks
    nor its outputs), and they are never part of ``state_dict``."""
    model = _model(names=("lora4", "mix", "lora8"))
    ids, mask = _left_padded(b=3)
    names = ["lora4", "mix", "lora8"]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, adapter_names=names).logits
        twin = copy.deepcopy(model)
        sites = [m for m in model.modules() if getattr(m, "batch_stacks", None) is not None]
        assert sites, "the mixed batch should have cached stacks (else this test checks nothing)"
        twin_sites = [m for m in twin.modules() if getattr(m, "batch_stacks", None) is not None]
        def ptrs(obj):
            if isinstance(obj, torch.Tensor):
                return {obj.data_ptr()}
            items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
            return set().union(*(ptrs(v) for v in items)) if items else set()
        assert len(twin_sites) == len(sites)
        assert all(ptrs(a.batch_stacks[2]).isdisjoint(ptrs(b.batch_stacks[2])) for a, b in zip(sites, twin_sites))
        randomize_adapter_(twin, seed=11, scale=0.3)
        twin_out = twin(ids, attention_mask=mask, adapter_names=names).logits
        torch.testing.assert_close(twin_out, _alone(twin, ids, mask, names), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(twin_out, ref)
        assert torch.equal(model(ids, attention_mask=mask, adapter_names=names).logits, ref)
    assert not any("batch_stacks" in k for k in model.state_dict())
