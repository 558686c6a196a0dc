"""Fused MixLoRA decode hidden-state kernel vs its eager reference (interpreter on CPU, bf16 on GPU)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel module's import

import pytest
import torch

from moelora_kernels.mixlora_ffn import mixlora_expert_hidden, mixlora_expert_hidden_reference

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _inputs(T, D, FF, E, R, K, dtype, device, seed=0, same_expert=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype).to(device)  # noqa: E731
    x, g0, u0 = r(T, D), r(T, FF), r(T, FF)
    a_g, a_u = r(E, R, D, sc=0.3), r(E, R, D, sc=0.3)
    b_g, b_u = r(E, FF, R, sc=0.3), r(E, FF, R, sc=0.3)
    if same_expert:
        idx = torch.zeros(T, K, dtype=torch.long)
        idx[:, 1:] = torch.arange(1, K)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return x, g0, u0, a_g, b_g, a_u, b_u, idx.to(device), w.to(device)


CASES = [(1, 42, 123, 4, 3, 2), (3, 64, 37, 4, 16, 4), (5, 6, 130, 1, 1, 1), (2, 300, 70, 8, 8, 2)]


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("T,D,FF,E,R,K", CASES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_matches_reference_fp32(T, D, FF, E, R, K, act):
    dev = "cuda" if CUDA else "cpu"
    args = _inputs(T, D, FF, E, R, K, torch.float32, dev)
    h, hm = mixlora_expert_hidden(*args, scaling=0.7, act=act, block_f=32, block_d=64)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=0.7, act=act)
    torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hm, rhm, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
def test_all_tokens_same_expert_and_fp16():
    dev = "cuda" if CUDA else "cpu"
    args = _inputs(4, 48, 80, 4, 4, 2, torch.float16, dev, same_expert=True)
    h, hm = mixlora_expert_hidden(*args, scaling=2.0, block_f=32, block_d=32)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=2.0)
    torch.testing.assert_close(h, rh, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hm, rhm, atol=2e-2, rtol=2e-2)


def test_bad_activation_and_shapes():
    args = _inputs(1, 8, 8, 2, 2, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unsupported activation"):
        mixlora_expert_hidden(*args, scaling=1.0, act="relu2")
    x, g0, *rest = args
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlora_expert_hidden(x, g0[:, :4], *rest, scaling=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_llama_shape_on_gpu():
    args = _inputs(8, 4096, 11008, 8, 16, 2, torch.bfloat16, "cuda")
    h, hm = mixlora_expert_hidden(*args, scaling=2.0)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=2.0)
    for a, b in ((h, rh), (hm, rhm)):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, err
