"""The compiled MixLoRA expert hidden (``dispatch.compiled_expert_hidden``) against the eager
composition, its twin: outputs, loss and every gradient of a training step on fresh random
inputs, with and without the backward recompute, and an inference forward (fp32, CPU Inductor); and in
bf16 autocast (CPU, and the GPU where there is one), each measured against the fp32 eager step."""
import pytest
import torch

import moelora
from moelora.layers.dispatch import compiled_expert_hidden, plain_mixture_backward
from conftest import make_tiny, randomize_adapter_


def _model(dropout):
    torch.manual_seed(0)
    model = make_tiny("llama", hidden=48, inter=80, layers=2, heads=4, kv_heads=2)
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=8, lora_dropout=dropout,
                                                        expert_backend="fused"))
    randomize_adapter_(model, scale=0.1)
    return model


def _step(model, ids, mask, compiled, recompute):
    with compiled_expert_hidden(compiled), plain_mixture_backward(not recompute):
        model.zero_grad()
        torch.manual_seed(11)  # the same dropout masks in both forms
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}


def _count_calls(monkeypatch):
    from moelora.layers import mixture_hidden

    calls = []
    real = mixture_hidden.compiled_hidden
    monkeypatch.setattr(mixture_hidden, "compiled_hidden", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("recompute", [True, False])
def test_compiled_hidden_matches_the_eager_composition_in_training(recompute, monkeypatch):
    calls = _count_calls(monkeypatch)
    model = _model(dropout=0.1).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 61, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    eager = _step(model, ids, mask, False, recompute)
    assert not calls
    fast = _step(model, ids, mask, True, recompute)
    assert len(calls) == (4 if recompute else 2)  # 2 layers; the recompute runs it again in backward
    torch.testing.assert_close(fast[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], eager[1], atol=1e-6, rtol=1e-6)
    assert eager[2].keys() == fast[2].keys() and any("experts" in n for n in eager[2])
    for n, gr in eager[2].items():
        torch.testing.assert_close(fast[2][n], gr, atol=1e-5, rtol=1e-4, msg=n)


def test_compiled_hidden_matches_in_inference_and_the_switch_restores():
    model = _model(dropout=0.0).eval()
    ids = torch.randint(0, 61, (2, 70), generator=torch.Generator().manual_seed(2))  # > decode sizes: fused path
    with torch.no_grad():
        eager = model(ids).logits
        with compiled_expert_hidden():
            fast = model(ids).logits
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
    from moelora.layers.dispatch import compiled_hidden_applies

    assert not compiled_hidden_applies()


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_hidden_in_bf16_autocast_is_as_close_to_fp32_as_the_eager_composition(device):
    """The training form users run on the GPU (bf16-mixed: fp32 adapter, bf16 autocast). bf16 alone
    moves a gradient of this tiny model by 3-25% (rounding the base too), so fast-vs-eager in bf16
    measures noise: both are compared with the fp32 eager step instead, and the compiled hidden must
    be about as close to it as the eager composition is (a wrong gradient would be ~100% off)."""
    model = _model(dropout=0.1).to(device).train()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 61, (4, 33), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0

    def step(compiled):
        with torch.autocast(device, dtype=torch.bfloat16):
            return _step(model, ids, mask, compiled, recompute=True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

    ref = _step(model, ids, mask, False, recompute=True)  # fp32, eager
    eager, fast = step(False), step(True)
    assert abs(fast[1].item() - ref[1].item()) <= 1.5 * abs(eager[1].item() - ref[1].item()) + 2e-2
    assert ref[2].keys() == fast[2].keys()
    for n, gr in ref[2].items():
        assert rel(fast[2][n], gr) <= 1.5 * rel(eager[2][n], gr) + 1e-2, (n, rel(fast[2][n], gr), rel(eager[2][n], gr))


def test_the_backward_recompute_takes_the_form_its_forward_took(monkeypatch):
    """Lightning runs backward after training_step returned, outside a switch scoped around the
    forward: the recompute must still run the compiled form (and the eager one for an eager forward)."""
    calls = _count_calls(monkeypatch)
    model = _model(dropout=0.1).train()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with compiled_expert_hidden():
        loss = model(ids, labels=ids).loss
    assert len(calls) == 2  # the forwards of 2 layers
    loss.backward()
    assert len(calls) == 4  # and their recomputes, outside the scope
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    with compiled_expert_hidden():
        loss.backward()
    assert len(calls) == 4  # an eager forward recomputes eagerly, inside the scope or not
