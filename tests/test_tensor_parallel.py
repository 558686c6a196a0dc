"""Tensor-parallel adapted linears on DTensor with the gloo backend, 2 and 4 CPU processes (issue 18):
the sharded forward, every gradient and one optimizer step equal the dense reference, and the
collectives per layer: block-diagonal LoRA needs none beyond the base layer's; S-LoRA-style
sharding of plain LoRA one more on a column-parallel linear (the all-gather of x·A), none on a
row-parallel one (its partial sum joins the base's all-reduce); replicated LoRA none."""
import os

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import spawn_ranks

IN, OUT, R, SCALE = 16, 24, 8, 0.5
EXPECTED = {  # collectives per forward: (colwise, rowwise)
    "base": (0, 1), "bdlora": (0, 1), "slora": (1, 1), "replicated": (0, 1),
}


def _factors(form, style, n, g):
    if form == "bdlora":
        if style == "colwise":
            return torch.randn(R, IN, generator=g), torch.randn(OUT, R // n, generator=g)
        return torch.randn(R, IN // n, generator=g), torch.randn(OUT, R, generator=g)
    return torch.randn(R, IN, generator=g), torch.randn(OUT, R, generator=g)


def _worker(rank, n, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, init_device_mesh
        from torch.distributed.tensor.debug import CommDebugMode

        from moelora.parallel.tensor_parallel import TensorParallelLoraLinear, dense_delta_weight

        mesh = init_device_mesh("cpu", (n,))
        results = {}
        for style in ("colwise", "rowwise"):
            for form in ("bdlora", "slora", "replicated"):
                g = torch.Generator().manual_seed(7)
                w, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
                a, bb = _factors(form, style, n, g)
                x = torch.randn(3, 5, IN, generator=g)
                gy = torch.randn(3, 5, OUT, generator=g)
                mod = TensorParallelLoraLinear(w, b, a, bb, SCALE, style, form, mesh, nblocks=n)
                x_loc = x if style == "colwise" else x.chunk(n, dim=-1)[rank]
                with CommDebugMode() as comm:
                    y = mod(x_loc)
                count = comm.get_total_counts()
                # the dense reference, with autograd through the stored factors
                a_ref, b_ref = a.clone().requires_grad_(True), bb.clone().requires_grad_(True)
                y_ref = x @ (w + dense_delta_weight(a_ref, b_ref, SCALE, form, style, n)).T + b
                y_want = y_ref.chunk(n, dim=-1)[rank] if style == "colwise" else y_ref
                gy_loc = gy.chunk(n, dim=-1)[rank] if style == "colwise" else gy
                (y * gy_loc).sum().backward()
                (y_ref * gy).sum().backward()
                ok_y = torch.allclose(y, y_want.detach(), atol=1e-5, rtol=1e-5)
                # replicated factors too: DTensor sums their per-rank gradient shares in the backward
                ga, gb = mod.lora_A.grad.full_tensor(), mod.lora_B.grad.full_tensor()
                ok_g = torch.allclose(ga, a_ref.grad, atol=1e-4, rtol=1e-5) and torch.allclose(gb, b_ref.grad, atol=1e-4, rtol=1e-5)
                opt = torch.optim.SGD([mod.lora_A, mod.lora_B], lr=0.1)
                opt.step()
                ok_step = torch.allclose(mod.lora_A.full_tensor(), (a_ref - 0.1 * a_ref.grad).detach(), atol=1e-5) \
                    and torch.allclose(mod.lora_B.full_tensor(), (b_ref - 0.1 * b_ref.grad).detach(), atol=1e-5)
                results[(style, form)] = (ok_y, ok_g, ok_step, count)
            with CommDebugMode() as comm:  # the base layer alone: its own collectives
                xl = x if style == "colwise" else x.chunk(n, dim=-1)[rank]
                wl = w.chunk(n, dim=0 if style == "colwise" else 1)[rank]
                yb = torch.nn.functional.linear(xl, wl)
                if style == "rowwise":
                    DTensor.from_local(yb, mesh, [Partial()]).redistribute(mesh, [Replicate()])
            results[(style, "base")] = (True, True, True, comm.get_total_counts())
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_adapters_equal_dense_and_count_collectives(n):
    got, exitcodes = spawn_ranks(_worker, n, timeout=240)
    assert exitcodes == [0] * n
    for rank, results in got.items():
        for (style, form), (ok_y, ok_g, ok_step, count) in results.items():
            assert ok_y, f"rank {rank}: {style} {form} output differs from the dense reference"
            assert ok_g, f"rank {rank}: {style} {form} gradients differ from the dense reference"
            assert ok_step, f"rank {rank}: {style} {form} SGD step differs from the dense reference"
            want = EXPECTED[form][0 if style == "colwise" else 1]
            assert count == want, f"{style} {form}: {count} collectives per forward, expected {want}"
        for style in ("colwise", "rowwise"):
            base = results[(style, "base")][3]
            assert results[(style, "bdlora")][3] == base
        assert results[("colwise", "slora")][3] > results[("colwise", "base")][3]
