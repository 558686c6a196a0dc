"""Gathered LoRA experts: Triton kernels vs the eager reference vs a per-token loop.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before the
kernels are defined): fp32 tight, fp16 loose, small shapes. bf16 and sync/graph checks need a
GPU (``-m gpu``). Run: ``TRITON_INTERPRET=1 PYTHONPATH=kernels pytest -x -q
kernels/moelora_kernels/tests/test_gathered_lora.py``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moelora_kernels import gathered_lora as gl  # noqa: E402
from moelora_kernels import launch_keys, tiles  # noqa: E402
from moelora_kernels.gathered_lora import (  # noqa: E402
    gathered_lora,
    gathered_lora_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {  # (atol, rtol); fp16 is computed in fp32 and rounded once per output/grad
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def make_inputs(T, IN, OUT, E, R, K, *, weighted, per_slot, dtype=torch.float32, device=DEVICE,
                seed=0, idx=None):
    """Fresh random inputs scaled so outputs are O(1); B is random, never the LoRA zero init."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((T, K, IN) if per_slot else (T, IN), generator=g)
    A = torch.randn(E, R, IN, generator=g) / IN**0.5
    B = torch.randn(E, OUT, R, generator=g) / R**0.5
    if idx is None:  # top-k style: K distinct experts per token
        idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g).softmax(-1) + 0.1 if weighted else None
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(A), cast(B), idx.to(device), (w.to(device) if weighted else None)


def loop_lora(x, A, B, idx, weight, scaling):
    """The plainest possible definition, token by token, slot by slot, in float64."""
    T, K = idx.shape
    rows = []
    for t in range(T):
        slots = []
        for k in range(K):
            e = int(idx[t, k])
            xv = (x[t, k] if x.dim() == 3 else x[t]).double()
            delta = scaling * (B[e].double() @ (A[e].double() @ xv))
            slots.append(delta * (float(weight[t, k]) if weight is not None else 1.0))
        rows.append(sum(slots) if weight is not None else torch.stack(slots))
    return torch.stack(rows)


def grads(fn, x, A, B, idx, w, s, gy=None):
    ins = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    wi = w.detach().clone().requires_grad_() if w is not None else None
    y = fn(*ins, idx, wi, s)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    y.backward(gy)
    return y.detach(), [t.grad for t in ins] + ([wi.grad] if wi is not None else []), gy


def assert_close(a, b, dtype, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=msg or None)


# (T, IN, OUT, E, R, K, weighted, per_slot, impl)
FWD_CASES = [
    (1, 42, 123, 4, 8, 2, True, False, "gather"),  # decode, LoRA-Switch linear
    (1, 123, 6, 4, 3, 4, True, True, "gather"),  # K == E, per-slot input
    (3, 6, 42, 4, 16, 2, False, False, "gather"),  # per-slot output (MixLoRA gate/up)
    (3, 123, 42, 1, 1, 1, True, False, "gather"),  # E = 1, r = 1
    (17, 42, 123, 4, 3, 2, True, False, "tile"),
    (17, 123, 42, 4, 8, 2, True, True, "tile"),  # MixLoRA down: own hidden, weighted sum
    (17, 6, 123, 4, 16, 4, False, False, "tile"),  # K == E
    (17, 42, 6, 4, 1, 1, False, True, "tile"),
    (3, 42, 42, 1, 16, 1, True, True, "tile"),
    (5, 42, 42, 4, 3, 2, False, True, "auto"),
    (19, 42, 123, 5, 8, 1, True, False, "segment"),  # serving LoRA: one slot per token
    (19, 123, 42, 6, 8, 2, True, True, "segment"),  # MixLoRA down: own hidden, weighted sum
    (19, 42, 123, 4, 3, 2, True, False, "segment"),  # weighted sum over slots of a shared input
    (17, 6, 42, 4, 16, 2, False, False, "segment"),  # per-slot output (MixLoRA gate/up)
    (3, 42, 6, 3, 1, 1, False, True, "segment"),
]


@pytest.mark.parametrize("case", FWD_CASES, ids=str)
def test_reference_matches_loop(case):
    T, IN, OUT, E, R, K, weighted, per_slot, _ = case
    x, A, B, idx, w = make_inputs(T, IN, OUT, E, R, K, weighted=weighted, per_slot=per_slot,
                                  dtype=torch.float64, device="cpu")
    y = gathered_lora_reference(x, A, B, idx, w, 0.5)
    assert y.shape == ((T, OUT) if weighted else (T, K, OUT))
    torch.testing.assert_close(y, loop_lora(x, A, B, idx, w, 0.5), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("per_slot", [False, True])
def test_reference_gradcheck(weighted, per_slot):
    x, A, B, idx, w = make_inputs(3, 5, 4, 3, 2, 2, weighted=weighted, per_slot=per_slot,
                                  dtype=torch.float64, device="cpu")
    ins = [t.requires_grad_() for t in (x, A, B)]
    if w is not None:
        w = w.double().requires_grad_()

    def fn(x_, a_, b_, *w_):
        return gathered_lora_reference(x_, a_, b_, idx, w_[0] if w_ else None, 0.7)

    assert torch.autograd.gradcheck(fn, (*ins, *([w] if w is not None else [])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", FWD_CASES, ids=str)
def test_forward_matches_reference(case, dtype):
    T, IN, OUT, E, R, K, weighted, per_slot, impl = case
    x, A, B, idx, w = make_inputs(T, IN, OUT, E, R, K, weighted=weighted, per_slot=per_slot,
                                  dtype=dtype, seed=1)
    y = gathered_lora(x, A, B, idx, w, 0.5, impl=impl)
    assert y.dtype == dtype and y.shape == ((T, OUT) if weighted else (T, K, OUT))
    assert_close(y, gathered_lora_reference(x, A, B, idx, w, 0.5), dtype)


# Backward runs twice the kernels, so a subset that still covers both paths, modes and inputs.
BWD_CASES = [FWD_CASES[i] for i in (0, 1, 2, 4, 5, 6, 7, 10, 11, 12, 13)]


@pytest.mark.parametrize("case", BWD_CASES, ids=str)
def test_backward_matches_reference(case):
    T, IN, OUT, E, R, K, weighted, per_slot, impl = case
    inputs = make_inputs(T, IN, OUT, E, R, K, weighted=weighted, per_slot=per_slot, seed=2)
    fast = lambda *a: gathered_lora(*a, impl=impl)  # noqa: E731
    y, g, gy = grads(fast, *inputs, 0.5)
    y_ref, g_ref, _ = grads(gathered_lora_reference, *inputs, 0.5, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for name, a, b in zip(["dx", "dA", "dB", "dweight"], g, g_ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, torch.float32, msg=name)


def _sweep():
    """A deterministic slice of T x R x E x K x mode x impl, IN/OUT cycling through 6/42/123."""
    sizes, cases = [6, 42, 123], []
    for i, (T, R, E) in enumerate(itertools.product([1, 3, 17], [1, 3, 8, 16], [1, 4])):
        for j, K in enumerate(sorted({1, min(2, E), E})):
            weighted, per_slot = (i + j) % 2 == 0, (i // 2 + j) % 2 == 0
            # gather at T=17 crawls in the interpreter; every third case takes the segment path
            impl = "segment" if (i + j) % 3 == 0 else ("gather" if T < 17 else "tile")
            cases.append((T, sizes[(i + j) % 3], sizes[(i + 2 * j + 1) % 3], E, R, K, weighted,
                          per_slot, impl))
    return cases


@pytest.mark.parametrize("case", _sweep(), ids=str)
def test_sweep_forward_backward(case):
    T, IN, OUT, E, R, K, weighted, per_slot, impl = case
    inputs = make_inputs(T, IN, OUT, E, R, K, weighted=weighted, per_slot=per_slot, seed=T + R + K)
    y, g, gy = grads(lambda *a: gathered_lora(*a, impl=impl), *inputs, 0.25)
    y_ref, g_ref, _ = grads(gathered_lora_reference, *inputs, 0.25, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for name, a, b in zip(["dx", "dA", "dB", "dweight"], g, g_ref):
        assert_close(a, b, torch.float32, msg=name)


def test_many_experts_take_the_segment_path():
    """32 experts x rank 16 is too wide for the all-experts tile: auto takes "segment" at T > 32
    (each expert's slots in tensor-core tiles; "gather", CUDA cores and the factors read per
    token, made a 7B serving prefill step ~4x the base's) and "gather" up to the serving graph
    buckets' 64 tokens."""
    assert gl._pick_path(65, 32, 16, "auto") == "segment"
    assert gl._pick_path(64, 32, 16, "auto") == gl._pick_path(32, 32, 16, "auto") == "gather"
    assert gl._pick_path(40, 4, 16, "auto") == "tile"
    inputs = make_inputs(65, 42, 6, 32, 16, 2, weighted=True, per_slot=False, seed=14)
    y, g, gy = grads(gathered_lora, *inputs, 0.5)
    y_ref, g_ref, _ = grads(gathered_lora_reference, *inputs, 0.5, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for name, a, b in zip(["dx", "dA", "dB", "dweight"], g, g_ref):
        assert_close(a, b, torch.float32, msg=name)


def test_segments_sort_the_slots_by_expert_with_a_bucket_for_the_rest(monkeypatch):
    """The segment path's order: every slot once, grouped by expert in slot order; bucket E
    (the last) holds the out-of-range slots, whose programs store zeros; one program per tile of
    at most BM slots of one expert, then programs with no tile (expert > E)."""
    monkeypatch.setitem(tiles.lookup(torch.device("cpu"))["gathered_lora"], "segment_bm", 2)
    idx = torch.tensor([[3, 0], [9, 3], [-1, 1], [0, 3]])
    order, block_e, meta = gl.segments(idx, 4)
    assert order.tolist() == [1, 6, 5, 0, 3, 7, 2, 4]
    start, count, tile_end = meta.tolist()
    assert count == [2, 1, 0, 3, 2] and start == [0, 2, 3, 3, 6] and tile_end == [1, 2, 2, 4, 5]
    assert block_e.tolist() == [0, 1, 3, 3, 4] + [5] * 4  # cdiv(8, 2) + 5 programs


def test_precomputed_segments_give_the_same_result():
    """A caller's ``segments(idx, E)`` (a serving step: once for all its linears) = computed inside."""
    x, A, B, idx, w = make_inputs(40, 42, 6, 9, 8, 1, weighted=True, per_slot=False, seed=15)
    y = gathered_lora(x, A, B, idx, w, 0.5, impl="segment")
    y_pre = gathered_lora(x, A, B, idx, w, 0.5, impl="segment", segments=gl.segments(idx, 9))
    assert torch.equal(y, y_pre)
    assert_close(y, gathered_lora_reference(x, A, B, idx, w, 0.5), torch.float32)


def test_backward_fp16():
    inputs = make_inputs(17, 42, 6, 4, 8, 2, weighted=True, per_slot=False, dtype=torch.float16, seed=3)
    y, g, gy = grads(gathered_lora, *inputs, 2.0)
    _, g_ref, _ = grads(gathered_lora_reference, *inputs, 2.0, gy=gy)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype
        assert_close(a, b, torch.float16)


@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
def test_all_tokens_one_expert_and_unused_experts(impl):
    """Every token picks expert 2 (and 0 as its second slot); experts 1 and 3 get no token."""
    T, E = 3 if impl == "gather" else 17, 4
    idx = torch.tensor([[2, 0]] * T)
    inputs = make_inputs(T, 42, 6, E, 3, 2, weighted=True, per_slot=False, idx=idx, seed=4)
    y, (dx, dA, dB, dw), gy = grads(lambda *a: gathered_lora(*a, impl=impl), *inputs, 0.5)
    y_ref, g_ref, _ = grads(gathered_lora_reference, *inputs, 0.5, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for a, b in zip((dx, dA, dB, dw), g_ref):
        assert_close(a, b, torch.float32)
    # Unused experts get exactly zero gradient (written, not left as garbage).
    assert torch.all(dA[[1, 3]] == 0) and torch.all(dB[[1, 3]] == 0)


def test_single_token_k_equals_e_matches_loop():
    x, A, B, idx, w = make_inputs(1, 123, 42, 4, 16, 4, weighted=True, per_slot=False, seed=5)
    y = gathered_lora(x, A, B, idx, w, 1.5)
    assert_close(y.cpu().double(), loop_lora(x.cpu(), A.cpu(), B.cpu(), idx.cpu(), w.cpu(), 1.5),
                 torch.float32)


@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
def test_strided_inputs_and_int32_idx(impl):
    """Non-contiguous x / A / weight / idx and int32 indices go through the stride arguments."""
    T = 3 if impl == "gather" else 17
    x, A, B, idx, w = make_inputs(T, 42, 6, 4, 8, 2, weighted=True, per_slot=False, seed=6)
    x_nc = torch.stack([x, x], dim=-1)[..., 0]  # stride 2 along IN
    A_nc = A.transpose(1, 2).contiguous().transpose(1, 2)
    idx_nc = idx.to(torch.int32).t().contiguous().t()
    w_nc = w.t().contiguous().t()
    assert not (x_nc.is_contiguous() or A_nc.is_contiguous() or idx_nc.is_contiguous())
    y, g, gy = grads(lambda *a: gathered_lora(*a, impl=impl), x_nc, A_nc, B, idx_nc, w_nc, 0.5)
    y_ref, g_ref, _ = grads(gathered_lora_reference, x, A, B, idx, w, 0.5, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for a, b in zip(g, g_ref):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("case", [BWD_CASES[0], BWD_CASES[5], BWD_CASES[2], BWD_CASES[7], BWD_CASES[10]], ids=str)
def test_every_element_written(case, monkeypatch):
    """All kernel buffers start as NaN: any element a kernel skips would surface in the result."""
    def nan_alloc(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(gl, "_alloc", nan_alloc)
    T, IN, OUT, E, R, K, weighted, per_slot, impl = case
    inputs = make_inputs(T, IN, OUT, E, R, K, weighted=weighted, per_slot=per_slot, seed=8)
    y, g, _ = grads(lambda *a: gathered_lora(*a, impl=impl), *inputs, 0.5)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("max_split", [16, 3])
@pytest.mark.parametrize("case", [FWD_CASES[0], FWD_CASES[2], FWD_CASES[5], FWD_CASES[6], FWD_CASES[11]], ids=str)
def test_split_over_in(case, max_split, monkeypatch):
    """Small IN chunks force the IN-split partials (uneven too: 8 chunks over 3 splits)."""
    cfg = tiles.lookup(torch.device(DEVICE))["gathered_lora"]
    monkeypatch.setitem(cfg, "gather_bk", 16)
    monkeypatch.setitem(cfg, "tile_bk", 16)
    monkeypatch.setitem(cfg, "segment_bk", 16)
    monkeypatch.setitem(cfg, "max_split", max_split)
    T, _, OUT, E, R, K, weighted, per_slot, impl = case
    inputs = make_inputs(T, 123, OUT, E, R, K, weighted=weighted, per_slot=per_slot, seed=13)
    h = gl._shrink(inputs[0] if per_slot else inputs[0].unsqueeze(1), inputs[1], inputs[3],
                   impl if impl != "auto" else "tile")
    assert h.shape[0] == min(8, max_split)
    y, g, gy = grads(lambda *a: gathered_lora(*a, impl=impl), *inputs, 0.5)
    y_ref, g_ref, _ = grads(gathered_lora_reference, *inputs, 0.5, gy=gy)
    assert_close(y, y_ref, torch.float32)
    for name, a, b in zip(["dx", "dA", "dB", "dweight"], g, g_ref):
        assert_close(a, b, torch.float32, msg=name)


@pytest.mark.parametrize("case", ["lora_slots", "mixlora_virtual_experts"])
def test_prefill_sizes_compile_no_variant_the_warmup_sizes_did_not(case, monkeypatch):
    """The serving engine's warm-up runs two prefill sizes (128 and 129 tokens: a multiple of 16
    and one more) so that no later prefill step compiles a kernel inside a timed step. That holds
    only if a launch's compiled variant depends on the token count through its divisibility by
    16 alone, not through the IN-split it sets. Launches recorded, not run, at a 7B layer's sizes
    with the H100/H200's 132 SMs: every prefill size up to 2048 tokens maps onto those of 128/129."""
    monkeypatch.setattr(gl.backend, "sm_count", lambda device: 132)
    E, R, K = (32, 64, 1) if case == "lora_slots" else (32 * 8 + 1, 16, 2)
    IN, OUT = 4096, 11008
    x = torch.zeros(2048, IN)
    A, B = torch.zeros(E, R, IN), torch.zeros(E, OUT, R)

    def keys_for(sizes):
        with launch_keys.recording(run=False) as keys, torch.no_grad():
            for T in sizes:
                idx = torch.arange(T * K).view(T, K) % E
                gathered_lora(x[:T], A, B, idx, torch.ones(T, K), 1.0)
        return keys

    warm = keys_for((128, 129))
    later = keys_for(range(65, 2049, 3))
    assert later <= warm, sorted(later - warm)


@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
def test_deterministic(impl):
    inputs = make_inputs(5, 42, 42, 4, 8, 2, weighted=True, per_slot=True, seed=9)
    fast = lambda *a: gathered_lora(*a, impl=impl)  # noqa: E731
    y1, g1, gy = grads(fast, *inputs, 0.5)
    y2, g2, _ = grads(fast, *inputs, 0.5, gy=gy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_no_grad_for_frozen_inputs():
    """needs_input_grad is honoured: only B trainable still gives the right dB."""
    x, A, B, idx, w = make_inputs(5, 42, 6, 4, 8, 2, weighted=True, per_slot=False, seed=10)
    Bg = B.clone().requires_grad_()
    gathered_lora(x, A, Bg, idx, w, 0.5).sum().backward()
    Br = B.clone().requires_grad_()
    gathered_lora_reference(x, A, Br, idx, w, 0.5).sum().backward()
    assert_close(Bg.grad, Br.grad, torch.float32)


@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
def test_out_of_range_slot_contributes_zero(impl):
    """Documented CUDA behaviour (no range check there: it would sync): such slots add nothing.

    Calls the autograd Function directly, since the CPU entry point rejects the indices first.
    """
    x, A, B, idx, w = make_inputs(3, 42, 6, 4, 8, 2, weighted=True, per_slot=False, seed=12)
    bad = idx.clone()
    bad[0, 1], bad[1, 1], bad[2, 1] = 7, -1, 4
    y = gl.GatheredLoraFunction.apply(x, A, B, bad, w, 0.5, impl)
    w0 = w.clone()
    w0[:, 1] = 0
    assert_close(y, gathered_lora_reference(x, A, B, idx, w0, 0.5), torch.float32)


def test_empty_batch():
    x, A, B, idx, w = make_inputs(0, 6, 6, 4, 3, 2, weighted=True, per_slot=False)
    assert gathered_lora(x, A, B, idx, w).shape == (0, 6)


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda d: d.update(x=d["x"][:, :-1]), ValueError, "x must be"),
        (lambda d: d.update(x=d["x"][:, None].expand(-1, 3, -1)), ValueError, "x must be"),
        (lambda d: d.update(B=d["B"][:, :, :-1]), ValueError, "does not match lora_A"),
        (lambda d: d.update(A=d["A"][0]), ValueError, "lora_A must be"),
        (lambda d: d.update(idx=d["idx"][:, 0]), ValueError, "idx must be"),
        (lambda d: d.update(idx=d["idx"].float()), TypeError, "int32 or int64"),
        (lambda d: d.update(w=d["w"][:, :1]), ValueError, "weight must be"),
        (lambda d: d.update(A=d["A"].half()), TypeError, "share one floating dtype"),
        (lambda d: d.update(idx=d["idx"] + 2), ValueError, r"\[0, 4\)"),
        (lambda d: d.update(idx=d["idx"] - 4), ValueError, r"\[0, 4\)"),
    ],
)
def test_bad_inputs(mutate, err, match):
    x, A, B, idx, w = make_inputs(3, 6, 6, 4, 3, 2, weighted=True, per_slot=False, device="cpu")
    d = dict(x=x, A=A, B=B, idx=idx, w=w)
    mutate(d)
    for fn in (gathered_lora_reference, gathered_lora):
        with pytest.raises(err, match=match):
            fn(d["x"], d["A"], d["B"], d["idx"], d["w"])


def test_bad_impl():
    x, A, B, idx, w = make_inputs(3, 6, 6, 4, 3, 2, weighted=True, per_slot=False)
    with pytest.raises(ValueError, match="impl"):
        gathered_lora(x, A, B, idx, w, impl="dense")
    x, A, B, idx, w = make_inputs(3, 6, 6, 32, 16, 2, weighted=True, per_slot=False)
    with pytest.raises(ValueError, match="impl='tile'"):  # 32 experts x 16 ranks > 256 columns
        gathered_lora(x, A, B, idx, w, impl="tile")


# --------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
@pytest.mark.parametrize("weighted, per_slot", [(True, False), (True, True), (False, False)])
def test_gpu_bf16(impl, weighted, per_slot):
    T = 8 if impl == "gather" else 300
    E = 40 if impl == "segment" else 8
    inputs = make_inputs(T, 520, 390, E, 16, 2, weighted=weighted, per_slot=per_slot,
                         dtype=torch.bfloat16, seed=11)
    y, g, gy = grads(lambda *a: gathered_lora(*a, impl=impl), *inputs, 2.0)
    # bf16 reference itself rounds; compare both to an fp32 reference of the same numbers.
    f32 = [t.float() if t is not None and t.is_floating_point() else t for t in inputs]
    y_ref, g_ref, _ = grads(gathered_lora_reference, *f32, 2.0, gy=gy.float())
    scale = lambda t: t.float().abs().max().clamp_min(1e-6)  # noqa: E731
    assert ((y.float() - y_ref).abs().max() / scale(y_ref)) < 2e-2
    for name, a, b in zip(["dx", "dA", "dB", "dweight"], g, g_ref):
        assert ((a.float() - b).abs().max() / scale(b)) < 3e-2, name


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["gather", "tile", "segment"])
def test_gpu_no_host_sync_and_graph_capture(impl):
    T = 4 if impl == "gather" else 256
    x, A, B, idx, w = make_inputs(T, 256, 384, 8, 16, 2, weighted=True, per_slot=False,
                                  dtype=torch.bfloat16)
    xs, As, Bs, ws = (t.clone().requires_grad_() for t in (x, A, B, w))
    gathered_lora(xs, As, Bs, idx, ws, impl=impl).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gathered_lora(xs, As, Bs, idx, ws, impl=impl).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Static shapes and no sync: the forward can be captured in a CUDA graph and replayed
    # with new routing written into the same idx buffer.
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gathered_lora(x, A, B, idx, w, impl=impl)
        with torch.cuda.graph(graph):
            y_static = gathered_lora(x, A, B, idx, w, impl=impl)
    torch.cuda.current_stream().wait_stream(stream)
    idx.copy_(idx.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    y_ref = gathered_lora_reference(x.float(), A.float(), B.float(), idx, w)
    assert (y_static.float() - y_ref).abs().max() < 2e-2 * y_ref.abs().max()


