"""The in-place decode LoRA add (lora_decode.lora_decode_add_) vs its eager reference, one-launch and
split forms, shared and per-slot inputs, plain LoRA (interpreter on CPU, fp32/fp16)."""
import pytest
import torch

from decode_cases import DEV, mixlora_inputs, needs_kernels
from moelora_kernels.lora_decode import lora_decode_add_, lora_decode_add_reference


@needs_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one_launch", "split"])
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("T,IN,OUT,E,R,K", [(1, 42, 123, 4, 3, 2), (3, 70, 37, 8, 16, 2), (2, 9, 300, 1, 1, 1), (5, 33, 17, 4, 8, 4)])
def test_lora_decode_add_matches_reference(per_slot, T, IN, OUT, E, R, K, split):
    dev = DEV
    g = torch.Generator().manual_seed(T * 7 + K)
    x = torch.randn((T, K, IN) if per_slot else (T, IN), generator=g).to(dev)
    a = (torch.randn(E, R, IN, generator=g) * 0.3).to(dev)
    b = (torch.randn(E, OUT, R, generator=g) * 0.3).to(dev)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    w = torch.softmax(torch.randn(T, K, generator=g), -1).to(dev)
    y0 = torch.randn(T, OUT, generator=g).to(dev)
    y = lora_decode_add_(y0.clone(), x, a, b, idx, w, 1.5, block_n=32, block_d=16, split=split, chunk=16)
    ref = lora_decode_add_reference(y0.clone(), x, a, b, idx, w, 1.5)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="shape mismatch"):
        lora_decode_add_(y0[:, :-1].clone(), x, a, b, idx, w, 1.5)


@needs_kernels
def test_lora_decode_add_plain_lora_and_out_of_place():
    """idx=None is plain LoRA (one adapter, weight 1); out= leaves y untouched."""
    dev = DEV
    g = torch.Generator().manual_seed(3)
    T, IN, OUT, R = 3, 37, 70, 5
    x, y0 = torch.randn(T, IN, generator=g).to(dev), torch.randn(T, OUT, generator=g).to(dev)
    a, b = (torch.randn(R, IN, generator=g) * 0.3).to(dev), (torch.randn(OUT, R, generator=g) * 0.3).to(dev)
    ref = (y0 + 0.8 * (x @ a.t()) @ b.t())
    y = y0.clone()
    for split in (False, True):
        out = lora_decode_add_(y, x, a, b, None, None, 0.8, block_n=32, block_d=16, out=torch.empty_like(y),
                               split=split, chunk=16)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(y, y0)
    torch.testing.assert_close(lora_decode_add_(y, x, a, b, None, None, 0.8), ref, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_delta_only_split_form():
    """y=None writes s Σ_k w B A x alone (fp32 out), y is neither needed nor read."""
    dev = DEV
    x, _, _, a, _, _, _, idx, w = mixlora_inputs(3, 37, 5, 4, 5, 2, torch.float32, dev, seed=8)
    b = (torch.randn(4, 70, 5, generator=torch.Generator().manual_seed(9)) * 0.3).to(dev)
    out = torch.full((3, 70), float("nan"), device=dev)
    lora_decode_add_(None, x, a, b, idx, w, 0.6, out=out, split=True, chunk=16, block_n=32)
    ref = lora_decode_add_reference(torch.zeros(3, 70, device=dev), x, a, b, idx, w, 0.6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="delta only"):
        lora_decode_add_(None, x, a, b, idx, w, 0.6, out=out)


@needs_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one_launch", "split"])
def test_lora_decode_add_fp16(split):
    """fp16 in and out, fp32 math inside: one rounding of y + delta, as the reference."""
    g = torch.Generator().manual_seed(11)
    T, IN, OUT, E, R, K = 3, 40, 50, 4, 4, 2
    x = torch.randn(T, IN, generator=g).half().to(DEV)
    a = (torch.randn(E, R, IN, generator=g) * 0.3).half().to(DEV)
    b = (torch.randn(E, OUT, R, generator=g) * 0.3).half().to(DEV)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(DEV)
    w = torch.softmax(torch.randn(T, K, generator=g), -1).to(DEV)
    y0 = torch.randn(T, OUT, generator=g).half().to(DEV)
    y = lora_decode_add_(y0.clone(), x, a, b, idx, w, 0.9, block_n=16, block_d=16, split=split, chunk=16)
    torch.testing.assert_close(y, lora_decode_add_reference(y0.clone(), x, a, b, idx, w, 0.9), atol=2e-2, rtol=2e-2)
