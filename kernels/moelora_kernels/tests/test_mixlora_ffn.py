"""The fused MixLoRA decode hidden-state kernel (mixlora_ffn) vs its eager reference, with and
without the fused router, one-launch and split forms (interpreter on CPU, bf16 on GPU)."""
import pytest
import torch

from decode_cases import CUDA, DEV, mixlora_inputs, needs_kernels
from moelora_kernels.mixlora_ffn import mixlora_expert_hidden, mixlora_expert_hidden_reference, route_topk_reference


CASES = [(1, 42, 123, 4, 3, 2), (3, 64, 37, 4, 16, 4), (5, 6, 130, 1, 1, 1), (2, 300, 70, 8, 8, 2)]


@needs_kernels
@pytest.mark.parametrize("T,D,FF,E,R,K", CASES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_matches_reference_fp32(T, D, FF, E, R, K, act):
    dev = DEV
    args = mixlora_inputs(T, D, FF, E, R, K, torch.float32, dev)
    h, hm = mixlora_expert_hidden(*args, scaling=0.7, act=act, block_f=32, block_d=64)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=0.7, act=act)
    torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hm, rhm, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_all_tokens_same_expert_and_fp16():
    dev = DEV
    args = mixlora_inputs(4, 48, 80, 4, 4, 2, torch.float16, dev, same_expert=True)
    h, hm = mixlora_expert_hidden(*args, scaling=2.0, block_f=32, block_d=32)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=2.0)
    torch.testing.assert_close(h, rh, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(hm, rhm, atol=2e-2, rtol=2e-2)


def test_bad_activation_and_shapes():
    args = mixlora_inputs(1, 8, 8, 2, 2, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unsupported activation"):
        mixlora_expert_hidden(*args, scaling=1.0, act="relu2")
    x, g0, *rest = args
    with pytest.raises(ValueError, match="shape mismatch"):
        mixlora_expert_hidden(x, g0[:, :4], *rest, scaling=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_bf16_llama_shape_on_gpu():
    args = mixlora_inputs(8, 4096, 11008, 8, 16, 2, torch.bfloat16, "cuda")
    h, hm = mixlora_expert_hidden(*args, scaling=2.0)
    rh, rhm = mixlora_expert_hidden_reference(*args, scaling=2.0)
    for a, b in ((h, rh), (hm, rhm)):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 1e-2, err


@needs_kernels
@pytest.mark.parametrize("split", [False, True], ids=["one_launch", "split"])
@pytest.mark.parametrize("T,D,FF,E,R,K", [(1, 42, 123, 4, 3, 2), (3, 64, 37, 8, 16, 2), (2, 30, 50, 5, 4, 5), (4, 16, 20, 3, 2, 1)])
def test_fused_router_matches_reference(T, D, FF, E, R, K, split):
    dev = DEV
    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = mixlora_inputs(T, D, FF, E, R, K, torch.float32, dev, seed=T)
    wr = torch.randn(E, D, generator=torch.Generator().manual_seed(9)).to(dev)
    h, hm, idx, w, probs = mixlora_expert_hidden(x, g0, u0, a_g, b_g, a_u, b_u, scaling=0.5,
                                                 router_weight=wr, top_k=K, block_f=32, block_d=16, split=split,
                                                 chunk=16)
    ridx, rw, rprobs = route_topk_reference(x, wr, K)
    torch.testing.assert_close(probs, rprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ridx, -1).values)
    torch.testing.assert_close(w, rw, atol=1e-5, rtol=1e-5)
    rh, rhm = mixlora_expert_hidden_reference(x, g0, u0, a_g, b_g, a_u, b_u, idx, w, 0.5)
    torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hm, rhm, atol=1e-4, rtol=1e-4)
