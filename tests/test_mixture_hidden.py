"""The compiled MixLoRA expert hidden (``dispatch.compiled_expert_hidden``) against the eager
composition, its twin: outputs, loss and every gradient of a training step on fresh random
inputs, with and without the backward recompute, and an inference forward (fp32, CPU Inductor)."""
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast, GPU Inductor)")
def test_compiled_hidden_matches_the_eager_composition_on_the_gpu_in_bf16_autocast():
    """The training form users run on the GPU (bf16-mixed: fp32 adapter, bf16 autocast): loss and
    gradients of the compiled hidden against the eager composition, loose (bf16) tolerances."""
    model = _model(dropout=0.1).cuda().train()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 61, (4, 33), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0

    def step(compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _step(model, ids, mask, compiled, recompute=True)

    eager, fast = step(False), step(True)
    torch.testing.assert_close(fast[1], eager[1], atol=2e-2, rtol=2e-2)
    for n, gr in eager[2].items():
        rel = (fast[2][n].float() - gr.float()).norm() / gr.float().norm().clamp_min(1e-12)
        assert rel < 3e-2, (n, rel.item())
