"""Host-side cost per call of the ops on the batch-1 decode path (eager decode is launch-bound).

    python kernels/benchmarks/launch_overhead.py            # on a GPU
    python kernels/benchmarks/launch_overhead.py --cprofile # + where the host time of one MixLoRA FFN call goes

For each op it reports (a) host µs per call with no synchronisation (what eager decode pays when
the GPU is idle waiting for the CPU) and (b) device µs per call (CUDA events around 200 calls).
Ops: a torch F.linear at decode shape, our Triton kernels at decode shape, and one whole FFN
layer: the frozen LlamaMLP vs MixLoRA (eval, fused decode path) vs MixLoRA (eager backend).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import _repo_paths  # noqa: F401 - moelora and moelora_kernels without install
from moelora.bench.timing import time_call_ms
from moelora.bench.versions import record_versions


def _calls(fn, n: int):
    def run():
        for _ in range(n):
            fn()
    return run


def host_us(fn, n: int = 200) -> float:
    """Host µs per call, no synchronisation: what eager decode pays while the GPU waits."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    us = time_call_ms(_calls(fn, n), device="cpu") / n * 1e3
    torch.cuda.synchronize()
    return us


def device_us(fn, n: int = 200) -> float:
    """Device µs per call: CUDA events around ``n`` calls."""
    return time_call_ms(_calls(fn, n), device="cuda") / n * 1e3


def main() -> None:
    sys.path.insert(0, "kernels/benchmarks")
    from benchmark_mixlora_block import build_block, set_backend
    from moelora_kernels.gathered_lora import gathered_lora, gathered_lora_reference
    from moelora_kernels.mixlora_ffn import mixlora_expert_hidden

    dev, dt = "cuda", torch.bfloat16
    D, FF, E, R, K = 4096, 11008, 8, 16, 2
    x = torch.randn(1, D, device=dev, dtype=dt)
    W = torch.randn(FF, D, device=dev, dtype=dt) * 0.02
    A = torch.randn(E, R, D, device=dev, dtype=dt) * 0.02
    B = torch.randn(E, FF, R, device=dev, dtype=dt) * 0.02
    idx = torch.tensor([[1, 5]], device=dev)
    w = torch.tensor([[0.6, 0.4]], device=dev)
    g0 = torch.randn(1, FF, device=dev, dtype=dt)
    block = build_block(D, FF, E, K, R, dt, dev).eval()
    xb = x.view(1, 1, D)
    ops = {
        "torch F.linear (1x4096 @ 11008x4096)": lambda: F.linear(x, W),
        "torch add (1x11008)": lambda: g0 + g0,
        "triton gathered_lora T=1 weighted (2 launches)": lambda: gathered_lora(x, A, B, idx, w, 2.0),
        "torch gathered_lora_reference T=1": lambda: gathered_lora_reference(x, A, B, idx, w, 2.0),
        "triton mixlora_expert_hidden T=1 (1 launch)": lambda: mixlora_expert_hidden(x, g0, g0, A, B, A, B, idx, w, 2.0),
        "frozen LlamaMLP layer T=1": lambda: block.base_layer(xb),
    }
    rows = []
    with torch.inference_mode():
        for name, fn in ops.items():
            rows.append({"op": name, "host_us": host_us(fn), "device_us": device_us(fn)})
        for backend in ("fused", "eager"):
            set_backend(block, backend)
            fn = lambda: block(xb)  # noqa: E731
            rows.append({"op": f"MixLoRA FFN layer T=1 backend={backend}", "host_us": host_us(fn), "device_us": device_us(fn)})
    print(f"{'op':<52} {'host us':>9} {'device us':>10}")
    for r in rows:
        print(f"{r['op']:<52} {r['host_us']:>9.1f} {r['device_us']:>10.1f}")
    print(json.dumps({"device": torch.cuda.get_device_name(), **record_versions(), "rows": rows}))
    if "--cprofile" in sys.argv:
        import cProfile
        import pstats

        set_backend(block, "fused")
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            for _ in range(200):
                block(xb)
            prof.disable()
        torch.cuda.synchronize()
        print("MixLoRA FFN layer T=1, fused backend, 200 calls (no_grad):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
