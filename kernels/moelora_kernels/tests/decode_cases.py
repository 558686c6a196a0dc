"""Shared by the decode-kernel tests (test_mixlora_ffn, test_lora_decode, test_ops): random inputs
and the composed eager references. Not a test module."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel modules' import

from moelora_kernels import backend  # noqa: E402
from moelora_kernels.lora_decode import lora_decode_add_reference  # noqa: E402
from moelora_kernels.mixlora_ffn import mixlora_expert_hidden_reference, route_topk_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not backend.interpreted() and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")


def mixlora_inputs(T, D, FF, E, R, K, dtype, device, seed=0, same_expert=False):
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


def ffn_inputs(dev, seed=5, T=2, D=24, FF=40, E=4, R=3, dtype=torch.float32, sc=0.3):
    """Keyword arguments of ops.mixlora_ffn_decode; the router stays fp32, as in MixLoraFFN."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=sc: (torch.randn(*s, generator=g) * sc).to(dev, dtype)  # noqa: E731
    return dict(x=r(T, D, sc=1.0), gate_w=r(FF, D), gate_b=None, up_w=r(FF, D), up_b=r(FF), down_w=r(D, FF),
                down_b=r(D), a_gate=r(E, R, D), b_gate=r(E, FF, R), a_up=r(E, R, D), b_up=r(E, FF, R),
                a_down=r(E, R, FF), b_down=r(E, D, R), router_weight=r(E, D, sc=1.0).float(), top_k=2,
                scaling=0.5, down_scaling=1.5, act="silu")


def ffn_reference(a):
    """The eager references composed: frozen GEMMs + routed expert hidden + down delta."""
    idx, w, probs = route_topk_reference(a["x"], a["router_weight"], a["top_k"])
    g0 = torch.nn.functional.linear(a["x"], a["gate_w"], a["gate_b"])
    u0 = torch.nn.functional.linear(a["x"], a["up_w"], a["up_b"])
    h, h_mix = mixlora_expert_hidden_reference(a["x"], g0, u0, a["a_gate"], a["b_gate"], a["a_up"], a["b_up"], idx, w,
                                               a["scaling"], a["act"])
    y = torch.nn.functional.linear(h_mix, a["down_w"], a["down_b"])
    if a["a_down"] is not None:
        y = lora_decode_add_reference(y, h, a["a_down"], a["b_down"], idx, w, a["down_scaling"])
    return y, idx, w, probs
