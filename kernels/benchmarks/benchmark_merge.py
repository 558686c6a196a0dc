"""Benchmark the fused LoRA-Switch merge (MergePlan) against copy bandwidth and torch.

    python kernels/benchmarks/benchmark_merge.py --shape llama2-7b --experts 8 --top-k 2 \
        --rank 16 --out results_dir [--check] [--sweep]
    TRITON_INTERPRET=1 python kernels/benchmarks/benchmark_merge.py --small --check --out /tmp/b

Providers (ms per merge of ALL adapted linears, median of --repeats, CUDA events):
  copy_same_bytes   plan.restore(): W <- W0, the exact bytes a pristine merge moves (the floor)
  copy_1024mib      a plain 1 GiB -> 1 GiB device copy (docs/anchors.md's copy-bandwidth method)
  triton_merge      MergePlan.merge with a new random selection every call (never skipped)
  triton_skip       MergePlan.merge with the selection already merged (the in-kernel skip)
  torch_unfused     per matrix: gather B[idx], A[idx], scale, addmm(W0, B, A, out=W)
  torch_addmm_      per matrix: one in-place addmm_ of prebuilt rank-K*R factors (ANCHORS' 14.1 ms)
Bandwidth = (bytes read + bytes written) / time; merge and copies count 2 x weight bytes.
Writes results.json and results.csv to --out. Memory: weights + W0 (2 x 12.9 GB for Llama-2-7B)
plus the adapters and their packed copy.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
from pathlib import Path

import _repo_paths  # noqa: F401 - moelora and moelora_kernels without install

# name: (layers, hidden, kv dim, ffn); the 7 adapted linears of a Llama-style layer.
SHAPES = {
    "llama2-7b": (32, 4096, 4096, 11008),
    "llama3-8b": (32, 4096, 1024, 14336),  # GQA: k/v are 1024 x 4096
    "small": (2, 64, 32, 96),
}
# (block_m, block_n, num_warps, programs/SM); each is timed without and with evict-first hints.
# Adapter bytes re-read (from L2) per W byte = R·K·(1/BN + 1/BM): bigger tiles re-read less but
# hold more registers per program (fewer W bytes in flight per SM).
SWEEP = [(64, 128, 4, 8), (64, 128, 8, 8), (64, 64, 4, 16), (128, 128, 8, 4), (128, 64, 4, 8),
         (32, 128, 4, 16), (64, 128, 4, 10**9), (32, 128, 4, 32), (32, 128, 4, 10**9), (32, 256, 4, 8),
         (32, 256, 8, 8), (16, 256, 4, 16), (64, 256, 8, 4), (128, 128, 4, 4), (128, 256, 8, 2)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="llama2-7b")
    p.add_argument("--small", action="store_true",
                   help="tiny shape; runs on CPU under TRITON_INTERPRET=1")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--in-place", action="store_true", help="benchmark the paper's in-place form")
    p.add_argument("--block-m", type=int, default=32)
    p.add_argument("--block-n", type=int, default=256)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--programs-per-sm", type=int, default=8)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="no evict-first L2 hints on W0/W")
    p.add_argument("--sweep", action="store_true",
                   help="time several launch configs, keep the best")
    p.add_argument("--check", action="store_true", help="verify against the reference first")
    p.add_argument("--warmup", type=int, default=None, help="default 5 (1 with --small)")
    p.add_argument("--repeats", type=int, default=None, help="default 30 (3 with --small)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.small:
        args.shape = "small"
    if args.warmup is None:
        args.warmup = 1 if args.small else 5
    if args.repeats is None:
        args.repeats = 3 if args.small else 30
    if args.repeats < 20 and not args.small:
        p.error("--repeats must be >= 20 for reportable numbers")
    return args


def layer_shapes(name: str) -> list[tuple[int, int]]:
    layers, d, kv, ffn = SHAPES[name]
    one = [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]  # q k v o gate up down
    return one * layers


def build(args, torch, device, dtype, shapes):
    """Random weights and experts (never zeros) -> (params, lora_A, lora_B, scalings)."""
    n, r = args.experts, args.rank
    params, lora_a, lora_b = [], [], []
    for out_f, in_f in shapes:
        params.append(torch.nn.Parameter(torch.randn(out_f, in_f, device=device, dtype=dtype),
                                         requires_grad=False))
        lora_a.append(torch.randn(n, r, in_f, device=device, dtype=dtype) * in_f ** -0.5)
        lora_b.append(torch.randn(n, out_f, r, device=device, dtype=dtype) * 0.02)
    return params, lora_a, lora_b, [2.0] * len(shapes)


def selections(torch, n, k, count, device):
    """`count` random (idx, gate) pairs, each differing from its neighbours (cyclically), so a
    rotation through them never hits the skip path (for K=1 the softmax gate is always 1.0)."""
    out = []
    while len(out) < count:
        idx = torch.randperm(n)[:k]
        gate = torch.softmax(torch.randn(k), 0) if n > 1 else torch.rand(k) + 0.5
        neighbours = [out[-1][0]] if out else []
        if len(out) == count - 1 and out:
            neighbours.append(out[0][0])
        if n > 1 and any(torch.equal(idx, other) for other in neighbours):
            continue
        out.append((idx, gate))
    return [(i.to(device), g.to(device)) for i, g in out]


def check(args, torch, mm, device, dtype) -> dict:
    """Kernel vs reference on a few real-shaped matrices, plus bit-exact restore."""
    layers, d, kv, ffn = SHAPES[args.shape]
    shapes = [(d, d), (kv, d), (ffn, d), (d, ffn)] if not args.small else layer_shapes("small")
    params, a, b, s = build(args, torch, device, dtype, shapes)
    w0 = [p.detach().clone() for p in params]
    plan = mm.MergePlan(params, a, b, s, pristine=not args.in_place)
    worst = 0.0
    for idx, gate in selections(torch, args.experts, args.top_k, 3, device):
        plan.merge(idx, gate)
        want = [w.clone() for w in w0]
        mm.merge_selected_adapters_reference(want, w0, a, b, s, idx, gate)
        for got, ref in zip(params, want):
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            torch.testing.assert_close(got.detach(), ref, atol=tol * 4, rtol=tol)
            worst = max(worst, (got.float() - ref.float()).abs().max().item())
    plan.restore()
    exact = all(torch.equal(p, w) for p, w in zip(params, w0))
    if not args.in_place and not exact:
        raise AssertionError("restore() is not bit-exact")
    print(f"check: {len(shapes)} matrices match the reference (max |diff| {worst:.3g}), "
          f"restore bit-exact: {exact}")
    return {"matrices": len(shapes), "max_abs_diff": worst, "restore_bit_exact": exact}


def main(argv=None) -> None:
    args = parse_args(argv)
    dev_name = args.device or ("cuda" if _cuda_available() else "cpu")
    if dev_name == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported
    import torch

    from moelora.bench.jsonio import write_json  # torch and triton only after TRITON_INTERPRET is set
    from moelora.bench.output import write_csv
    from moelora.bench.timing import time_ms as timed
    from moelora.bench.versions import record_versions
    from moelora_kernels import merge as mm

    device = torch.device(dev_name)
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu (triton interpreter)",
        **record_versions(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.check:
        result["check"] = check(args, torch, mm, device, dtype)

    shapes = layer_shapes(args.shape)
    params, lora_a, lora_b, scalings = build(args, torch, device, dtype, shapes)
    plan = mm.MergePlan(params, lora_a, lora_b, scalings, pristine=not args.in_place,
                        top_k=args.top_k)
    nbytes = 2 * plan.weight_bytes  # read W0 (or W) + write W
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    # One endless rotation shared by every timed merge: consecutive calls never repeat a selection.
    sels = selections(torch, args.experts, args.top_k, args.warmup + args.repeats + 1, device)
    rotation = itertools.cycle(sels)
    rows = []

    def time_ms(fn):  # CUDA events around each call on GPU (never host time of async work)
        return timed(fn, args.warmup, args.repeats, device)

    def record(name, times, moved=nbytes, **extra):
        ms = statistics.median(times)
        row = {"provider": name, "ms": ms, "ms_min": min(times), "ms_max": max(times),
               "n": len(times), "bytes": moved, "GB_per_s": moved / ms / 1e6 if moved else None,
               **extra}
        rows.append(row)
        print(f"{name:<34} {ms:9.3f} ms" + (f"  {row['GB_per_s']:9.1f} GB/s" if moved else ""))
        return row

    print(f"{args.shape}: {len(shapes)} matrices, {plan.weight_bytes / 1e9:.2f} GB of weights, "
          f"N={args.experts} K={args.top_k} R={args.rank} {args.dtype}, {result['device']}")
    # Copy floors: the merge's own bytes (W <- W0 is exactly restore()) and a 1 GiB copy.
    copy_bw = {}
    if not args.in_place:
        row = record("copy_same_bytes (restore)", time_ms(plan.restore))
        copy_bw["same_bytes"] = row["GB_per_s"]
    src = torch.empty(2**29 if on_gpu else 2**19, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    name = f"copy_{src.numel() * 2 // 2**20}mib"
    row = record(name, time_ms(lambda: dst.copy_(src)), moved=2 * src.numel() * 2)
    copy_bw["plain"] = row["GB_per_s"]
    del src, dst
    ref_bw = copy_bw.get("same_bytes", copy_bw["plain"])

    configs = [c + (st,) for c in SWEEP for st in (False, True)] if args.sweep else [
        (args.block_m, args.block_n, args.num_warps, args.programs_per_sm, args.stream)]
    best = None
    for bm, bn, nw, pps, st in configs:
        plan.set_launch_config(bm, bn, nw, max_programs=pps * sms if on_gpu else None, stream=st)
        times = time_ms(lambda: plan.merge(*next(rotation)))
        bw = nbytes / statistics.median(times) / 1e6
        row = record(f"triton_merge {bm}x{bn} w{nw} grid{plan.grid[0]}{' evict_first' if st else ''}", times,
                     block_m=bm, block_n=bn, num_warps=nw, grid=plan.grid[0], stream=st,
                     frac_of_copy_bw=bw / ref_bw, frac_of_plain_copy_bw=bw / copy_bw["plain"])
        if best is None or row["ms"] < best["ms"]:
            best = row
    plan.set_launch_config(best["block_m"], best["block_n"], best["num_warps"], best["grid"], best["stream"])
    best["best"] = True
    idx, gate = sels[0]
    plan.merge(idx, gate, force=True)
    record("triton_skip (same selection)", time_ms(lambda: plan.merge(idx, gate)), moved=0)

    # Unfused torch baselines on the same weights. In pristine mode W0 is read from the plan's
    # buffer (MergePlan.pristine_weights: views, as a second 12.9 GB copy would not fit the budget).
    w0_views = [p.detach() for p in params] if args.in_place else plan.pristine_weights()

    def torch_unfused():
        idx, gate = next(rotation)
        for w, w0, a, b, s in zip(params, w0_views, lora_a, lora_b, scalings):
            bk = b[idx] * (gate * s).to(b.dtype)[:, None, None]                 # (K, out, R)
            bk = bk.permute(1, 0, 2).reshape(b.shape[1], -1)                    # (out, K*R)
            torch.addmm(w0, bk, a[idx].reshape(-1, a.shape[2]), out=w.data)

    record("torch_unfused (gather+addmm)", time_ms(torch_unfused))
    k_r = args.top_k * args.rank
    factors = [(torch.randn(o, k_r, device=device, dtype=dtype) * 0.02,
                torch.randn(k_r, i, device=device, dtype=dtype) * i ** -0.5) for o, i in shapes]

    def torch_addmm_():
        for w, (bf, af) in zip(params, factors):
            w.data.addmm_(bf, af)

    record(f"torch_addmm_ (rank {k_r}, in place)", time_ms(torch_addmm_))
    if on_gpu:
        result["max_memory_allocated_GB"] = torch.cuda.max_memory_allocated(device) / 1e9

    result.update({
        "matrices": len(shapes), "weight_bytes": plan.weight_bytes, "copy_GB_per_s": copy_bw,
        "merge_ms": best["ms"], "merge_GB_per_s": best["GB_per_s"],
        "merge_frac_of_copy_bw": best["frac_of_copy_bw"], "target_frac": 0.75,
        "launches_per_merge": plan.num_launches_per_merge, "rows": rows,
    })
    print(f"best merge: {best['ms']:.3f} ms = {best['GB_per_s']:.1f} GB/s = "
          f"{best['frac_of_copy_bw']:.0%} of copy bandwidth (target >= 75%)")
    write_json(args.out / "results.json", result, sort_keys=True)
    write_csv(args.out / "results.csv", rows, sorted({k for r in rows for k in r}))
    print(f"wrote {args.out / 'results.json'} and results.csv")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
