"""Fused MixLoRA decode hidden-state kernel vs its eager reference (interpreter on CPU, bf16 on GPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel module's import

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


# ---- fused router + the in-place decode LoRA kernel -------------------------------------------
from moelora_kernels.mixlora_ffn import lora_decode_add_, lora_decode_add_reference, route_topk_reference  # noqa: E402


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("split", [False, True], ids=["one_launch", "split"])
@pytest.mark.parametrize("T,D,FF,E,R,K", [(1, 42, 123, 4, 3, 2), (3, 64, 37, 8, 16, 2), (2, 30, 50, 5, 4, 5), (4, 16, 20, 3, 2, 1)])
def test_fused_router_matches_reference(T, D, FF, E, R, K, split):
    dev = "cuda" if CUDA else "cpu"
    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = _inputs(T, D, FF, E, R, K, torch.float32, dev, seed=T)
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


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("split", [False, True], ids=["one_launch", "split"])
@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("T,IN,OUT,E,R,K", [(1, 42, 123, 4, 3, 2), (3, 70, 37, 8, 16, 2), (2, 9, 300, 1, 1, 1), (5, 33, 17, 4, 8, 4)])
def test_lora_decode_add_matches_reference(per_slot, T, IN, OUT, E, R, K, split):
    dev = "cuda" if CUDA else "cpu"
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


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
def test_lora_decode_add_plain_lora_and_out_of_place():
    """idx=None is plain LoRA (one adapter, weight 1); out= leaves y untouched."""
    dev = "cuda" if CUDA else "cpu"
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


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
def test_delta_only_split_form():
    """y=None writes s Σ_k w B A x alone (fp32 out), y is neither needed nor read."""
    dev = "cuda" if CUDA else "cpu"
    x, _, _, a, _, _, _, idx, w = _inputs(3, 37, 5, 4, 5, 2, torch.float32, dev, seed=8)
    b = (torch.randn(4, 70, 5, generator=torch.Generator().manual_seed(9)) * 0.3).to(dev)
    out = torch.full((3, 70), float("nan"), device=dev)
    lora_decode_add_(None, x, a, b, idx, w, 0.6, out=out, split=True, chunk=16, block_n=32)
    ref = lora_decode_add_reference(torch.zeros(3, 70, device=dev), x, a, b, idx, w, 0.6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="delta only"):
        lora_decode_add_(None, x, a, b, idx, w, 0.6, out=out)


def _ffn_inputs(dev, seed=5, T=2, D=24, FF=40, E=4, R=3, dtype=torch.float32, sc=0.3):
    """Keyword arguments of ops.mixlora_ffn_decode; the router stays fp32, as in MixLoraFFN."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=sc: (torch.randn(*s, generator=g) * sc).to(dev, dtype)  # noqa: E731
    return dict(x=r(T, D, sc=1.0), gate_w=r(FF, D), gate_b=None, up_w=r(FF, D), up_b=r(FF), down_w=r(D, FF),
                down_b=r(D), a_gate=r(E, R, D), b_gate=r(E, FF, R), a_up=r(E, R, D), b_up=r(E, FF, R),
                a_down=r(E, R, FF), b_down=r(E, D, R), router_weight=r(E, D, sc=1.0).float(), top_k=2,
                scaling=0.5, down_scaling=1.5, act="silu")


def _ffn_reference(a):
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


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
def test_custom_ops_pass_opcheck_and_compile():
    """The torch.library ops of the compiled decode path: fake (meta) functions agree with the
    kernels (opcheck), and compiled calls of the entry points equal the eager references, for
    routed and plain LoRA linears and a MixLoRA FFN with and without down experts."""
    from moelora_kernels import ops

    dev = "cuda" if CUDA else "cpu"
    a = _ffn_inputs(dev)
    x, w_lin, bias = a["x"], a["down_w"][:, :24].contiguous(), a["down_b"]
    a_l, b_l = a["a_gate"], a["b_down"]
    idx, w, _ = route_topk_reference(x, a["router_weight"], 2)
    torch.library.opcheck(ops.linear_lora_delta_op, (x, w_lin, bias, a_l, b_l, idx, w, 1.5))
    torch.library.opcheck(ops.linear_lora_delta_op, (x, w_lin, None, a_l[0], b_l[0], None, None, 1.5))
    torch.library.opcheck(ops.mixlora_ffn_delta_op, tuple(a.values()))
    torch.library.opcheck(ops.mixlora_ffn_delta_op, tuple(dict(a, a_down=None, b_down=None).values()))

    lin = torch.compile(ops.linear_with_lora, backend="aot_eager", fullgraph=True)
    for i, g_, A, B in ((idx, w, a_l, b_l), (None, None, a_l[0], b_l[0])):
        plain = i is None  # the reference's plain LoRA: one expert, index 0, weight 1
        ref = lora_decode_add_reference(torch.nn.functional.linear(x, w_lin, bias), x, A[None] if plain else A,
                                        B[None] if plain else B,
                                        torch.zeros(2, 1, dtype=torch.long, device=dev) if plain else i,
                                        torch.ones(2, 1, device=dev) if plain else g_, 1.5)
        torch.testing.assert_close(lin(x, w_lin, bias, A, B, i, g_, 1.5), ref, atol=1e-4, rtol=1e-4)
    ffn = torch.compile(ops.mixlora_ffn_decode, backend="aot_eager", fullgraph=True)
    for args in (a, dict(a, a_down=None, b_down=None)):
        out, ref = ffn(**args), _ffn_reference(args)
        torch.testing.assert_close(out[1], ref[1])
        for j in (0, 2, 3):  # y, weights, probs
            torch.testing.assert_close(out[j], ref[j], atol=1e-4, rtol=1e-4)
        eager = ops.mixlora_ffn_decode(**args)  # the one-launch eager forms: same function
        torch.testing.assert_close(eager[0], ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not INTERP and not CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("T", [3, 17])
def test_split_forms_with_the_ops_launch_configs_match_references(T):
    """The split forms with the block widths the ops pick at T tokens (ops._tiles: wider blocks
    from 16 tokens on), fp32, odd sizes that leave partial blocks and chunks."""
    from moelora_kernels import ops

    dev = "cuda" if CUDA else "cpu"
    D, FF, E, R, K = 300, 270, 5, 6, 2
    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = _inputs(T, D, FF, E, R, K, torch.float32, dev, seed=T)
    wr = torch.randn(E, D, generator=torch.Generator().manual_seed(4)).to(dev)
    h, hm, idx, w, _ = mixlora_expert_hidden(x, g0, u0, a_g, b_g, a_u, b_u, scaling=0.5, router_weight=wr, top_k=K,
                                             split=True, chunk=ops._HIDDEN_CHUNK, **ops._tiles(ops._HIDDEN_TILES, T))
    rh, rhm = mixlora_expert_hidden_reference(x, g0, u0, a_g, b_g, a_u, b_u, idx, w, 0.5)
    torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hm, rhm, atol=1e-4, rtol=1e-4)
    tiles = {k: v for k, v in ops._tiles(ops._LORA_TILES, T).items() if k != "split"}
    a_d = (torch.randn(E, R, FF, generator=torch.Generator().manual_seed(5)) * 0.3).to(dev)
    b_d = (torch.randn(E, D, R, generator=torch.Generator().manual_seed(6)) * 0.3).to(dev)
    y0 = torch.randn(T, D, generator=torch.Generator().manual_seed(7)).to(dev)
    out = lora_decode_add_(y0, h, a_d, b_d, idx, w, 2.0, out=torch.empty_like(y0), split=True, **tiles)
    torch.testing.assert_close(out, lora_decode_add_reference(y0.clone(), h, a_d, b_d, idx, w, 2.0), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 32])
def test_split_forms_bf16_llama_shape_on_gpu(T):
    """The CUDA-graph (split) forms at the Llama-2-7B decode shape, with the launch configs the
    ops use at this token count (ops._tiles), agree with the references."""
    from moelora_kernels import ops

    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = _inputs(T, 4096, 11008, 8, 16, 2, torch.bfloat16, "cuda")
    wr = torch.randn(8, 4096, device="cuda") * 0.05
    h, hm, idx, w, probs = mixlora_expert_hidden(x, g0, u0, a_g, b_g, a_u, b_u, scaling=2.0, router_weight=wr,
                                                 top_k=2, split=True, chunk=ops._HIDDEN_CHUNK,
                                                 **ops._tiles(ops._HIDDEN_TILES, T))
    ridx, rw, _ = route_topk_reference(x, wr, 2)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ridx, -1).values)
    rh, rhm = mixlora_expert_hidden_reference(x, g0, u0, a_g, b_g, a_u, b_u, idx, w, 2.0)
    a_d, b_d = a_g[:, :, :4096].clone(), b_g[:, :4096].clone()
    for a, b in ((h, rh), (hm, rhm)):
        assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2
    tiles = {k: v for k, v in ops._tiles(ops._LORA_TILES, T).items() if k != "split"}
    for xin, a, b in ((x, a_d, b_d), (h, torch.randn(8, 16, 11008, device="cuda").bfloat16() * 0.02, b_d)):
        y0 = torch.randn(T, 4096, device="cuda").bfloat16()
        out = lora_decode_add_(y0, xin, a, b, idx, w, 2.0, out=torch.empty_like(y0), split=True, **tiles)
        ref = lora_decode_add_reference(y0.clone(), xin, a, b, idx, w, 2.0)
        assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_ops_side_stream_inside_cuda_graph_bf16():
    """The compiled-path ops fork a side stream for the adapter kernels and join it before they
    return. Captured into a CUDA graph (as HF's static-cache generate does) and replayed on new
    inputs, they must equal the references at the Llama-2-7B decode shapes: a missing join would
    read a half-written delta."""
    from moelora_kernels import ops

    a = _ffn_inputs("cuda", T=1, D=4096, FF=11008, E=8, R=16, dtype=torch.bfloat16, sc=0.02)
    lin = (a["x"], a["down_w"][:, :4096].contiguous(), None, a["a_gate"], a["b_down"])
    idx, w, _ = route_topk_reference(a["x"], a["router_weight"], 2)
    static = {"x": a["x"].clone(), "idx": idx.clone(), "w": w.clone()}

    def step():
        y, d = ops.linear_lora_delta_op(static["x"], *lin[1:], static["idx"], static["w"], 2.0)
        f = ops.mixlora_ffn_delta_op(**dict(a, x=static["x"]))
        return (y.float() + d).bfloat16(), (f[0].float() + f[1]).bfloat16(), f[2]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).cuda().bfloat16()
        i, g_, _ = route_topk_reference(x, a["router_weight"], 2)
        static["x"].copy_(x), static["idx"].copy_(i), static["w"].copy_(g_)
        graph.replay()
        torch.cuda.synchronize()
        ref_lin = lora_decode_add_reference(torch.nn.functional.linear(x, lin[1]), x, lin[3], lin[4], i, g_, 2.0)
        ref_y, ref_idx, _, _ = _ffn_reference(dict(a, x=x))
        assert torch.equal(torch.sort(outs[2], -1).values, torch.sort(ref_idx, -1).values)
        for out, ref in ((outs[0], ref_lin), (outs[1], ref_y)):
            assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2
