"""GPU time of the one-launch decode kernels inside CUDA graphs (what compiled decode pays per layer).

    python kernels/benchmarks/benchmark_decode_kernels.py --out DIR [--tokens 1,8]

In eager decode a launch costs more host time (~50 µs) than the kernel runs, so launch count is
what matters; under CUDA graphs (torch.compile mode="reduce-overhead", HF static cache) the host
cost vanishes and the kernel's own GPU time is what is left. This sweeps the launch configs of
``lora_decode_add_`` and ``mixlora_expert_hidden`` at Llama-2-7B decode shapes (8 experts, top-2,
r=16, bf16) with ``triton.testing.do_bench_cudagraph`` and compares with torch baselines timed the
same way: the frozen GEMV the delta rides on, and plain LoRA as two cuBLAS calls. Writes
decode_kernels.json/.csv with every row and the best config per case.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

import _repo_paths  # noqa: F401 - moelora and moelora_kernels without install
from moelora.bench.jsonio import write_json
from moelora.bench.output import write_csv
from moelora.bench.versions import record_versions

D, FF, E, R, K = 4096, 11008, 8, 16, 2
# one-launch form: (block_d, block_n|block_f, num_warps, programs); split form: (chunk, block_n|block_f,
# num_warps, programs)
CONFIGS = {False: list(itertools.product((256, 1024), (64, 128), (4, 8), (66, 132))),
           True: list(itertools.product((32, 64, 128, 256), (64, 128), (4, 8), (66, 132)))}
# --warps: the split form on the production grid (programs=None: one program per token and column
# block) at chunk 256, over block width and warps (moelora_kernels.ops._tiles picks the warps by T)
WARPS_CONFIGS = list(itertools.product((256,), (64, 128), (2, 4, 8), (None,)))


def bench_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3


def cases(T: int, dev, dt):
    from moelora_kernels.mixlora_ffn import lora_decode_add_, mixlora_expert_hidden

    g = torch.Generator(device=dev).manual_seed(T)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g).to(dt) * 0.02  # noqa: E731
    idx = torch.stack([torch.randperm(E, device=dev, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1)
    out = {}
    for name, (i, o, per_slot) in {"attn 4096->4096": (D, D, False), "gate/up 4096->11008": (D, FF, False),
                                   "down 11008->4096": (FF, D, False),
                                   "mixlora down per-slot 11008->4096": (FF, D, True)}.items():
        x = rnd(T, K, i) if per_slot else rnd(T, i)
        a, b, y = rnd(E, R, i), rnd(E, o, R), rnd(T, o)
        outb = torch.empty_like(y)
        out[f"lora_add routed {name}"] = (
            lambda bd, bn, nw, pr, sp, x=x, a=a, b=b, y=y, outb=outb: lora_decode_add_(
                y, x, a, b, idx, w, 2.0, block_n=bn, block_d=bd, num_warps=nw, programs=pr, out=outb, split=sp,
                chunk=bd))
    x, a, b, y = rnd(T, D), rnd(R, D), rnd(D, R), rnd(T, D)
    outb = torch.empty_like(y)
    out["lora_add plain attn 4096->4096"] = (
        lambda bd, bn, nw, pr, sp: lora_decode_add_(y, x, a, b, None, None, 2.0, block_n=bn, block_d=bd,
                                                    num_warps=nw, programs=pr, out=outb, split=sp, chunk=bd))
    g0, u0 = rnd(T, FF), rnd(T, FF)
    ag, bg, au, bu = rnd(E, R, D), rnd(E, FF, R), rnd(E, R, D), rnd(E, FF, R)
    wr = torch.randn(E, D, device=dev, generator=g)
    out["expert_hidden routed 4096->11008"] = (
        lambda bd, bn, nw, pr, sp: mixlora_expert_hidden(x, g0, u0, ag, bg, au, bu, scaling=2.0, router_weight=wr,
                                                         top_k=K, block_f=bn, block_d=bd, num_warps=nw, programs=pr,
                                                         split=sp, chunk=bd))
    W, Wf = rnd(D, D), rnd(FF, D)
    baselines = {
        "torch frozen GEMV 4096->4096 (F.linear)": lambda: F.linear(x, W),
        "torch frozen GEMV 4096->11008 (F.linear)": lambda: F.linear(x, Wf),
        "torch plain LoRA 4096->4096 (2 cuBLAS: linear + addmm)": lambda: torch.addmm(y, F.linear(x, a), b.t(), alpha=2.0),
    }
    return out, baselines


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a few configs only")
    p.add_argument("--warps", action="store_true", help="split form only, production grid, over block and warps")
    a = p.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    configs = {k: v[::5] for k, v in CONFIGS.items()} if a.quick else CONFIGS
    if a.warps:
        configs = {True: WARPS_CONFIGS}
    rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        kernels, baselines = cases(T, dev, dt)
        for name, fn in baselines.items():
            rows.append({"T": T, "case": name, "config": "", "us": bench_us(fn)})
            print(f"T={T} {name:<58} {rows[-1]['us']:8.2f} us", flush=True)
        for name, fn in kernels.items():
            for split in configs:
                form = "split" if split else "one-launch"
                best = None
                for bd, bn, nw, pr in configs[split]:
                    us = bench_us(lambda: fn(bd, bn, nw, pr, split))
                    rows.append({"T": T, "case": f"{name} [{form}]", "config": f"{'c' if split else 'd'}{bd} n{bn} "
                                 f"w{nw} p{pr or 'auto'}", "us": us})
                    best = rows[-1] if best is None or us < best["us"] else best
                best["best"] = True
                print(f"T={T} {name + ' [' + form + ']':<58} best {best['us']:8.2f} us ({best['config']})", flush=True)
    out = Path(a.out)
    env = {"device": torch.cuda.get_device_name(), **record_versions()}
    write_json(out / "decode_kernels.json", {"environment": env, "rows": rows}, indent=1)
    write_csv(out / "decode_kernels.csv", rows, ["T", "case", "config", "us", "best"])
    return rows


if __name__ == "__main__":
    main()
