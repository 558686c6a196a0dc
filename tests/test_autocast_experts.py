"""The gathered LoRA experts under torch.autocast (bf16-mixed training: fp32 adapter weights over a
bf16 base): their operands are cast to the autocast dtype, as autocast casts a matmul's, and the
gradients reach the fp32 parameters. Without it the Triton kernels ran their fp32 IEEE form
(H200, 7B shape: a MixLoRA training step 9x slower than PEFT LoRA's)."""
import pytest
import torch

import moelora
from moelora.layers.experts import _gathered_lora
from moelora_kernels import gathered_lora as gl
from conftest import make_tiny, randomize_adapter_


def _spy(monkeypatch, name):
    seen = []
    real = getattr(gl, name)

    def wrapper(x, lora_A, lora_B, idx, weight=None, scaling=1.0):
        seen.append((x.dtype, lora_A.dtype, lora_B.dtype, None if weight is None else weight.dtype))
        return real(x, lora_A, lora_B, idx, weight=weight, scaling=scaling)

    monkeypatch.setattr(gl, name, wrapper)
    return seen


def _operands(seed=0, T=9, K=2, E=4, R=8, IN=24, OUT=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, IN, generator=g)
    A = torch.randn(E, R, IN, generator=g, requires_grad=True)
    B = torch.randn(E, OUT, R, generator=g, requires_grad=True)
    idx = torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    return x, A, B, idx, w


def test_operands_take_the_autocast_dtype_and_grads_reach_fp32_weights(monkeypatch):
    seen = _spy(monkeypatch, "gathered_lora_reference")
    x, A, B, idx, w = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _gathered_lora(x, A, B, idx, w, scaling=0.5, kernel=False)
    assert seen == [(torch.bfloat16,) * 4] and y.dtype == torch.bfloat16
    ref = gl.gathered_lora_reference(x.bfloat16(), A.bfloat16(), B.bfloat16(), idx, w.bfloat16(), 0.5)
    torch.testing.assert_close(y.float(), ref.float(), atol=0.05, rtol=0.02)
    y.float().square().sum().backward()
    assert A.grad.dtype == B.grad.dtype == torch.float32
    assert A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    seen.clear()
    y32 = _gathered_lora(x, A, B, idx, w, scaling=0.5, kernel=False)  # autocast off: unchanged
    assert seen == [(torch.float32,) * 4] and y32.dtype == torch.float32


def _mix_model(device, base_dtype):
    model = make_tiny("llama", hidden=64, inter=96, layers=2, heads=4, kv_heads=2).to(device, base_dtype)
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=8, lora_dropout=0.0,
                                                        adapter_dtype="float32", expert_backend="fused"))
    randomize_adapter_(model, scale=0.05)
    return model.train()


def test_mixlora_bf16_mixed_step_runs_its_experts_in_bf16(monkeypatch):
    seen = _spy(monkeypatch, "gathered_lora_reference")
    model = _mix_model("cpu", torch.bfloat16)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert seen and all(d == torch.bfloat16 for s in seen for d in s if d is not None), seen
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expert = [n for n in grads if "experts" in n and "lora_A" in n]
    assert expert and all(grads[n] is not None and grads[n].dtype == torch.float32 for n in expert)
    assert all(torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0 for n in expert)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_experts_under_autocast_match_the_eager_loop_on_gpu(monkeypatch):
    """bf16-mixed MixLoRA step on CUDA: the Triton (tile) kernels get bf16 operands; loss and
    expert gradients match the eager expert loop under the same autocast (bf16, loose)."""
    res = {}
    for backend in ("eager", "fused"):
        seen = _spy(monkeypatch, "gathered_lora")
        torch.manual_seed(0)
        model = _mix_model("cuda", torch.bfloat16)
        for m in model.modules():
            if isinstance(m, moelora.MixLoraAdapter):
                m.backend = backend
        ids = torch.randint(0, 61, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        if backend == "fused":
            assert seen and all(d == torch.bfloat16 for s in seen for d in s if d is not None), seen
        res[backend] = (loss.float(), {n: p.grad.float() for n, p in model.named_parameters()
                                       if p.grad is not None and "experts" in n})
        monkeypatch.undo()
    torch.testing.assert_close(res["fused"][0], res["eager"][0], atol=2e-2, rtol=2e-2)
    for n, g in res["eager"][1].items():
        err = (res["fused"][1][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 5e-2, (n, err)
