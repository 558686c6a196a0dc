"""MergePlan (fused LoRA-Switch merge) against the eager reference.

CPU cases run the Triton kernel in the interpreter (fp32/fp16 only; it cannot do bf16 math);
bf16, sync-freedom and CUDA-graph cases are `gpu` and need CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first @triton.jit of moelora_kernels.merge (read at decoration time).
    os.environ["TRITON_INTERPRET"] = "1"

from moelora_kernels import backend  # noqa: E402
from moelora_kernels import merge as merge_mod  # noqa: E402
from moelora_kernels.merge import (  # noqa: E402
    MergePlan,
    merge_selected_adapters,
    merge_selected_adapters_reference,
)

SHAPES = [(6, 42), (123, 64), (42, 123), (64, 6)]  # odd sizes: partial tiles in both dims
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-2, rtol=2e-3),
       torch.bfloat16: dict(atol=8e-2, rtol=1.6e-2)}

cpu_interp = pytest.mark.skipif(
    not backend.interpreted(),
    reason="CPU cases need TRITON_INTERPRET=1 before moelora_kernels.merge is first imported")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(shapes=SHAPES, n=4, r=3, dtype=torch.float32, device="cpu", seed=0):
    """Random (never zero) weights, experts and scalings; returns params, A, B, s, W0 copies."""
    g = torch.Generator().manual_seed(seed)
    params, lora_a, lora_b = [], [], []
    for out_f, in_f in shapes:
        params.append(torch.nn.Parameter(torch.randn(out_f, in_f, generator=g).to(device, dtype),
                                         requires_grad=False))
        lora_a.append((0.5 * torch.randn(n, r, in_f, generator=g)).to(device, dtype))
        lora_b.append((0.5 * torch.randn(n, out_f, r, generator=g)).to(device, dtype))
    scalings = [0.5 + i for i in range(len(shapes))]
    w0 = [p.detach().clone() for p in params]
    return params, lora_a, lora_b, scalings, w0


def reference(w0, lora_a, lora_b, scalings, idx, gate):
    out = [w.clone() for w in w0]
    merge_selected_adapters_reference(out, w0, lora_a, lora_b, scalings, idx, gate)
    return out


def selection(n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k]
    gate = torch.rand(k, generator=g) + 0.1
    return idx.to(device), (gate / gate.sum()).to(device)


def poison(params):
    for p in params:
        p.data.fill_(float("nan"))


def assert_all_close(got, want, dtype):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.detach(), b, **TOL[dtype], msg=lambda m: f"matrix {i}: {m}")


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,r,k", [(1, 1, 1), (4, 3, 4), (4, 8, 1), (4, 16, 2)])
def test_matches_reference(dtype, n, r, k):
    params, a, b, s, w0 = make_case(n=n, r=r, dtype=dtype, seed=n * 100 + r)
    plan = MergePlan(params, a, b, s, block_m=32, block_n=64)
    assert plan.num_launches_per_merge == 1
    idx, gate = selection(n, k, seed=r)
    poison(params)  # every element must be written by the kernel
    plan.merge(idx.to(torch.int32), gate)
    assert_all_close(params, reference(w0, a, b, s, idx, gate), dtype)


@cpu_interp
def test_small_tiles_and_int64_idx():
    params, a, b, s, w0 = make_case(n=4, r=8)
    plan = MergePlan(params, a, b, s, block_m=16, block_n=16, max_programs=3)
    idx, gate = selection(4, 2, seed=1)
    poison(params)
    merge_selected_adapters(plan, idx.to(torch.int64), gate.half())
    assert_all_close(params, reference(w0, a, b, s, idx, gate.half()), torch.float32)


@cpu_interp
def test_module_keeps_parameter_and_uses_merged_weight():
    lin = torch.nn.Linear(42, 6, bias=False)
    weight = lin.weight
    a = torch.randn(2, 4, 42)
    b = torch.randn(2, 6, 4)
    w0 = weight.detach().clone()
    plan = MergePlan([lin.weight], [a], [b], [2.0])
    idx, gate = torch.tensor([1]), torch.tensor([0.7])
    plan.merge(idx, gate)
    assert lin.weight is weight
    x = torch.randn(3, 42)
    want = x @ reference([w0], [a], [b], [2.0], idx, gate)[0].T
    torch.testing.assert_close(lin(x).detach(), want, atol=1e-4, rtol=1e-5)


@cpu_interp
def test_one_launch_for_all_matrices(monkeypatch):
    params, a, b, s, _ = make_case(n=2, r=2)
    plan = MergePlan(params, a, b, s)
    calls = []
    kernel = merge_mod._merge_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr(merge_mod, "_merge_kernel", Counting())
    plan.merge(*selection(2, 2, seed=0))
    assert len(calls) == plan.num_launches_per_merge == 1


@cpu_interp
def test_same_selection_is_skipped_and_gate_change_is_not():
    params, a, b, s, w0 = make_case(n=4, r=3)
    plan = MergePlan(params, a, b, s, block_m=32, block_n=64)
    idx, gate = selection(4, 2, seed=3)
    plan.merge(idx, gate)
    want = reference(w0, a, b, s, idx, gate)
    # Poison, then repeat the selection: a skipped launch leaves the poison in place.
    poison(params)
    plan.merge(idx.clone(), gate.clone())
    assert all(torch.isnan(p).all() for p in params)
    plan.merge(idx, gate, force=True)
    assert_all_close(params, want, torch.float32)
    plan.merge(idx, gate)  # skipped again: W stays correct
    assert_all_close(params, want, torch.float32)
    # Same experts, new weights: must not be skipped.
    gate2 = gate.flip(0)
    poison(params)
    plan.merge(idx, gate2)
    assert_all_close(params, reference(w0, a, b, s, idx, gate2), torch.float32)


@cpu_interp
def test_restore_bit_exact_and_no_drift():
    shapes = [(42, 123), (6, 42)]
    params, a, b, s, w0 = make_case(shapes=shapes, n=4, r=3, dtype=torch.float16, seed=5)
    plan = MergePlan(params, a, b, s, block_m=32, block_n=64)
    for step in range(50):
        idx, gate = selection(4, 2, seed=1000 + step)
        plan.merge(idx, gate)
    # After 50 merges W is exactly what ONE merge of the last selection gives: no history.
    fresh = [torch.nn.Parameter(w.clone(), requires_grad=False) for w in w0]
    MergePlan(fresh, a, b, s, block_m=32, block_n=64).merge(idx, gate)
    for got, want in zip(params, fresh):
        assert torch.equal(got, want)
    assert_all_close(params, reference(w0, a, b, s, idx, gate), torch.float16)
    plan.restore()
    for got, want in zip(params, w0):
        assert torch.equal(got, want)
    plan.merge(idx, gate)  # the recorded selection equals this one, but W was restored
    assert_all_close(params, reference(w0, a, b, s, idx, gate), torch.float16)


@cpu_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_place_mode(dtype):
    params, a, b, s, w0 = make_case(n=4, r=8, dtype=dtype, seed=7)
    plan = MergePlan(params, a, b, s, pristine=False, block_m=32, block_n=64)
    assert plan._w0 is plan._w  # no pristine copy in this mode
    for seed in range(3):
        idx, gate = selection(4, 2, seed=seed)
        plan.merge(idx, gate)
        # Errors compound once per merge: allow a few roundings.
        tol = {k: 4 * v for k, v in TOL[dtype].items()}
        for got, want in zip(params, reference(w0, a, b, s, idx, gate)):
            torch.testing.assert_close(got.detach(), want, **tol)
    before = [p.detach().clone() for p in params]
    plan.merge(idx, gate)  # skipped: subtracting and re-adding would drift
    assert all(torch.equal(x, y) for x, y in zip(params, before))
    plan.restore()
    for got, want in zip(params, w0):
        torch.testing.assert_close(got.detach(), want, **{k: 4 * v for k, v in TOL[dtype].items()})


@cpu_interp
@pytest.mark.parametrize("pristine", [True, False])
def test_refresh_adapters(pristine):
    params, a, b, s, w0 = make_case(n=4, r=3, seed=11)
    plan = MergePlan(params, a, b, s, pristine=pristine, block_m=32, block_n=64)
    idx, gate = selection(4, 3, seed=2)
    plan.merge(idx, gate)
    for t in a + b:
        t.mul_(-1.5)  # "training" changed the experts
    plan.refresh_adapters()
    plan.merge(idx, gate)  # same selection, but it must not be skipped
    tol = {k: 4 * v for k, v in TOL[torch.float32].items()}
    for got, want in zip(params, reference(w0, a, b, s, idx, gate)):
        torch.testing.assert_close(got.detach(), want, **tol)


@cpu_interp
def test_out_of_range_index_is_reported_and_left_out():
    params, a, b, s, w0 = make_case(n=4, r=3, seed=13)
    plan = MergePlan(params, a, b, s, block_m=32, block_n=64)
    plan.merge(torch.tensor([4, 1]), torch.tensor([0.5, 0.25]))
    want = reference(w0, a, b, s, torch.tensor([1]), torch.tensor([0.25]))
    assert_all_close(params, want, torch.float32)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        plan.check_indices()
    plan.check_indices()  # the flag is cleared once reported


@pytest.mark.parametrize("breakage,match", [
    (lambda kw: kw["lora_A"].__setitem__(1, kw["lora_A"][1][:, :, :-1]), "lora_A\\[1\\] must be"),
    (lambda kw: kw["lora_B"].__setitem__(2, kw["lora_B"][2][:, :-1]), "lora_B\\[2\\] must be"),
    (lambda kw: kw["lora_A"].__setitem__(1, torch.randn(4, 5, 64)), "R=3"),
    (lambda kw: kw["lora_B"].__setitem__(0, torch.randn(3, 6, 3)), "N=4"),
    (lambda kw: kw["scalings"].pop(), "one lora_A, lora_B, scaling per weight"),
    (lambda kw: kw["weights"].__setitem__(1, kw["weights"][1].double()), "must share"),
    (lambda kw: kw["weights"].__setitem__(1, kw["weights"][0]), "shares storage"),
    (lambda kw: kw["weights"].__setitem__(0, torch.randn(6)), "2-D"),
])
def test_bad_plan_inputs(breakage, match):
    params, a, b, s, _ = make_case(n=4, r=3)
    kw = dict(weights=params, lora_A=a, lora_B=b, scalings=s)
    breakage(kw)
    with pytest.raises(ValueError, match=match):
        MergePlan(**kw)


@cpu_interp
def test_bad_merge_inputs():
    params, a, b, s, _ = make_case(n=4, r=3)
    with pytest.raises(ValueError, match="block_m"):
        MergePlan(params, a, b, s, block_m=24)
    plan = MergePlan(params, a, b, s, top_k=2)
    gate = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="K=2"):
        plan.merge(torch.tensor([0, 1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="int32/int64"):
        plan.merge(torch.tensor([0.0, 1.0]), gate)
    with pytest.raises(ValueError, match="1-D"):
        plan.merge(torch.tensor([0, 1]), gate[:1])
    with pytest.raises(ValueError, match="top_k"):
        MergePlan(params, a, b, s, top_k=5)


# ---------------------------------------------------------------- GPU (bf16, no sync, graphs)

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    shapes = SHAPES + [(256, 4096), (1024, 512)]
    params, a, b, s, w0 = make_case(shapes=shapes, n=8, r=16, dtype=dtype, device="cuda")
    plan = MergePlan(params, a, b, s)
    for seed in range(3):
        idx, gate = selection(8, 2, seed=seed, device="cuda")
        poison(params)
        plan.merge(idx, gate)
        assert_all_close(params, reference(w0, a, b, s, idx, gate), dtype)
    plan.restore()
    assert all(torch.equal(x, y) for x, y in zip(params, w0))


@gpu
@needs_cuda
def test_gpu_merge_has_no_host_sync():
    params, a, b, s, _ = make_case(n=8, r=16, dtype=torch.bfloat16, device="cuda")
    plan = MergePlan(params, a, b, s, top_k=2)
    idx, gate = selection(8, 2, seed=0, device="cuda")
    plan.merge(idx, gate)  # compile outside the checked region
    sels = [selection(8, 2, seed=seed, device="cuda") for seed in range(3)]  # H2D copies sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, g in sels:
            plan.merge(i, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
def test_gpu_cuda_graph_replay():
    params, a, b, s, w0 = make_case(n=8, r=16, dtype=torch.bfloat16, device="cuda")
    plan = MergePlan(params, a, b, s, top_k=2)
    idx = torch.zeros(2, dtype=torch.int64, device="cuda")
    gate = torch.zeros(2, device="cuda")
    plan.merge(idx, gate, force=True)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.merge(idx, gate)
    for seed in [0, 1, 1, 2]:  # a repeated selection exercises the in-graph skip
        new_idx, new_gate = selection(8, 2, seed=seed, device="cuda")
        idx.copy_(new_idx)
        gate.copy_(new_gate)
        graph.replay()
        assert_all_close(params, reference(w0, a, b, s, new_idx, new_gate), torch.bfloat16)


@cpu_interp
def test_pristine_weights_are_the_weights_before_any_merge():
    torch.manual_seed(0)
    ws = [torch.randn(32, 48), torch.randn(16, 32)]
    w0 = [w.clone() for w in ws]
    a = [torch.randn(4, 4, w.shape[1]) for w in ws]
    b = [torch.randn(4, w.shape[0], 4) for w in ws]
    plan = MergePlan(ws, a, b, [0.5, 0.5], pristine=True)
    plan.merge(torch.tensor([0, 2]), torch.tensor([0.6, 0.4]))
    assert not torch.equal(ws[0], w0[0])
    for got, want in zip(plan.pristine_weights(), w0):
        assert torch.equal(got, want)
