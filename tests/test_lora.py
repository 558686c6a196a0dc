"""Plain LoRA layer and injection: identity at init, equality with PEFT, merge/unmerge, export."""
import copy

import pytest
import torch

import moelora
from conftest import ARCHS, make_tiny, randomize_adapter_


def _ids(vocab=61, b=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "mixlora", "lora_switch"])
def test_zero_init_adapter_leaves_logits_unchanged(arch, method):
    model = make_tiny(arch)
    ids, mask = _ids()
    ref = model(ids, attention_mask=mask).logits
    cfg = {"lora": moelora.LoraConfig(r=4), "mixlora": moelora.MixLoraConfig(num_experts=3, top_k=2, r=4),
           "lora_switch": moelora.LoraSwitchConfig(num_experts=3, top_k=2, r=4)}[method]
    moelora.inject_adapter(model, cfg)
    out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40))
    with pytest.raises(moelora.UnsupportedArchitectureError, match="llama"):
        moelora.inject_adapter(model, moelora.LoraConfig())


def test_only_adapter_parameters_train_and_base_is_unchanged():
    model = make_tiny("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    randomize_adapter_(model)
    model.train()
    ids, mask = _ids()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    named = dict(model.named_parameters())
    for name, p in named.items():
        if moelora.inject.is_adapter_parameter(name):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any("router" in n for n in named if named[n].grad is not None)
    opt.step()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if not moelora.inject.is_adapter_parameter(k)}
    for k, v in base.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0)


def test_lora_equals_peft_on_same_weights(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny("llama")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_adapter_(model)
    # copy our tensors into PEFT's modules
    peft_sd = {}
    for k, v in moelora.adapter_state_dict(model).items():
        peft_sd[f"base_model.model.{k}".replace("lora_A", "lora_A.default.weight").replace("lora_B", "lora_B.default.weight")] = v
    missing = peft_model.load_state_dict(peft_sd, strict=False)
    assert not missing.unexpected_keys
    ids, mask = _ids()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                               peft_model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    # export -> PeftModel.from_pretrained round trip
    moelora.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path / "peft"))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                               model(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    model = make_tiny("llama").to(dtype)
    moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_dropout=0.0))
    randomize_adapter_(model)
    ids, _ = _ids()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(ids).logits
    moelora.merge_lora(model)
    moelora.merge_lora(model)  # merging twice changes nothing
    merged = model(ids).logits
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=tol, rtol=tol)
    lin = model.model.layers[0].self_attn.q_proj
    expect = (w0["model.layers.0.self_attn.q_proj.base_layer.weight"].float() + lin.adapters["default"].delta_weight()).to(dtype)
    torch.testing.assert_close(lin.base_layer.weight, expect, atol=0, rtol=0)
    moelora.unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_rslora_scaling_and_gaussian_init():
    cfg = moelora.LoraConfig(r=16, lora_alpha=32, use_rslora=True, init_lora_weights="gaussian")
    assert cfg.scaling == pytest.approx(32 / 4)
    model = moelora.inject_adapter(make_tiny("llama"), cfg)
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.adapters["default"].scaling == pytest.approx(8.0)
    assert torch.count_nonzero(lin.lora_B) == 0 and lin.lora_A.std() > 0


def test_adapter_dtype_bf16_on_fp32_base():
    model = moelora.inject_adapter(make_tiny("llama"), moelora.LoraConfig(r=4, adapter_dtype="bfloat16"))
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    ids, _ = _ids()
    assert model(ids).logits.dtype == torch.float32


@pytest.mark.parametrize("same_dtype", [False, True])
def test_training_forward_with_dropout_is_the_lora_formula(same_dtype: bool) -> None:
    """A LoRA linear's training forward with dropout from the adapter's own stream equals
    W x + s B A (x * keep) / (1 - p) for the mask that stream draws (fp32; fp32 adapter weights
    over a fp32 base: the in-place addmm path; over a float64 one: the delta path), whatever
    the order in which the layer applies s and 1/(1-p)."""
    from moelora.state import BatchPlan

    model = make_tiny("llama")
    moelora.inject_adapter(model, moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, adapter_dtype="float32"))
    randomize_adapter_(model, seed=0)
    state = moelora.adapter_state(model)
    site = model.model.layers[0].self_attn.q_proj
    a = site.adapters["default"]
    if not same_dtype:  # the frozen layer in float64: y's dtype differs from the adapter's (the delta path)
        site.base_layer.double()
    model.train()
    x = torch.randn(2, 5, site.base_layer.in_features, dtype=site.base_layer.weight.dtype)
    state.seed_dropout("default", 7)
    state.begin_forward(BatchPlan("default"), None, 0)
    try:
        y = site(x)
        state.seed_dropout("default", 7)
        keep = state.dropout_keep("default", tuple(x.shape), torch.bool, x.device, 0.5)
    finally:
        state.end_forward()
    assert 0 < int(keep.sum()) < keep.numel()
    xd = x.double()
    ref = torch.nn.functional.linear(xd, site.base_layer.weight.double()) + a.scaling * (
        (xd * keep / 0.5) @ a.lora_A.double().T @ a.lora_B.double().T)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
