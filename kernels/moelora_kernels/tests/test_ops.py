"""The decode entry points of ops.py (eager, split forms, torch.library custom ops) vs the composed
eager references; the GPU cases (``-m gpu``) cover bf16, CUDA graphs and the side stream."""
import pytest
import torch

from decode_cases import CUDA, DEV, ffn_inputs, ffn_reference, mixlora_inputs, needs_kernels
from moelora_kernels.lora_decode import lora_decode_add_, lora_decode_add_reference
from moelora_kernels.mixlora_ffn import mixlora_expert_hidden, mixlora_expert_hidden_reference, route_topk_reference


@needs_kernels
def test_custom_ops_pass_opcheck_and_compile():
    """The torch.library ops of the compiled decode path: fake (meta) functions agree with the
    kernels (opcheck), and compiled calls of the entry points equal the eager references, for
    routed and plain LoRA linears and a MixLoRA FFN with and without down experts."""
    from moelora_kernels import ops

    dev = DEV
    a = ffn_inputs(dev)
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
        out, ref = ffn(**args), ffn_reference(args)
        torch.testing.assert_close(out[1], ref[1])
        for j in (0, 2, 3):  # y, weights, probs
            torch.testing.assert_close(out[j], ref[j], atol=1e-4, rtol=1e-4)
        eager = ops.mixlora_ffn_decode(**args)  # the one-launch eager forms: same function
        torch.testing.assert_close(eager[0], ref[0], atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("T", [3, 17])
def test_split_forms_with_the_ops_launch_configs_match_references(T):
    """The split forms with the launch tiles the ops use at T tokens (the launchers' defaults from
    tiles.py: wider blocks of fewer warps from 16 tokens on), fp32, odd sizes that leave partial
    blocks and chunks."""
    dev = DEV
    D, FF, E, R, K = 300, 270, 5, 6, 2
    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = mixlora_inputs(T, D, FF, E, R, K, torch.float32, dev, seed=T)
    wr = torch.randn(E, D, generator=torch.Generator().manual_seed(4)).to(dev)
    h, hm, idx, w, _ = mixlora_expert_hidden(x, g0, u0, a_g, b_g, a_u, b_u, scaling=0.5, router_weight=wr, top_k=K,
                                             split=True)
    rh, rhm = mixlora_expert_hidden_reference(x, g0, u0, a_g, b_g, a_u, b_u, idx, w, 0.5)
    torch.testing.assert_close(h, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hm, rhm, atol=1e-4, rtol=1e-4)
    a_d = (torch.randn(E, R, FF, generator=torch.Generator().manual_seed(5)) * 0.3).to(dev)
    b_d = (torch.randn(E, D, R, generator=torch.Generator().manual_seed(6)) * 0.3).to(dev)
    y0 = torch.randn(T, D, generator=torch.Generator().manual_seed(7)).to(dev)
    out = lora_decode_add_(y0, h, a_d, b_d, idx, w, 2.0, out=torch.empty_like(y0), split=True)
    torch.testing.assert_close(out, lora_decode_add_reference(y0.clone(), h, a_d, b_d, idx, w, 2.0), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 32])
def test_split_forms_bf16_llama_shape_on_gpu(T):
    """The CUDA-graph (split) forms at the Llama-2-7B decode shape, with the launch configs the
    ops use at this token count (the launchers' defaults from tiles.py), agree with the references."""
    x, g0, u0, a_g, b_g, a_u, b_u, _, _ = mixlora_inputs(T, 4096, 11008, 8, 16, 2, torch.bfloat16, "cuda")
    wr = torch.randn(8, 4096, device="cuda") * 0.05
    h, hm, idx, w, probs = mixlora_expert_hidden(x, g0, u0, a_g, b_g, a_u, b_u, scaling=2.0, router_weight=wr,
                                                 top_k=2, split=True)
    ridx, rw, _ = route_topk_reference(x, wr, 2)
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(ridx, -1).values)
    rh, rhm = mixlora_expert_hidden_reference(x, g0, u0, a_g, b_g, a_u, b_u, idx, w, 2.0)
    a_d, b_d = a_g[:, :, :4096].clone(), b_g[:, :4096].clone()
    for a, b in ((h, rh), (hm, rhm)):
        assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2
    for xin, a, b in ((x, a_d, b_d), (h, torch.randn(8, 16, 11008, device="cuda").bfloat16() * 0.02, b_d)):
        y0 = torch.randn(T, 4096, device="cuda").bfloat16()
        out = lora_decode_add_(y0, xin, a, b, idx, w, 2.0, out=torch.empty_like(y0), split=True)
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

    a = ffn_inputs("cuda", T=1, D=4096, FF=11008, E=8, R=16, dtype=torch.bfloat16, sc=0.02)
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
        ref_y, ref_idx, _, _ = ffn_reference(dict(a, x=x))
        assert torch.equal(torch.sort(outs[2], -1).values, torch.sort(ref_idx, -1).values)
        for out, ref in ((outs[0], ref_lin), (outs[1], ref_y)):
            assert (out.float() - ref.float()).norm() / ref.float().norm() < 1e-2
