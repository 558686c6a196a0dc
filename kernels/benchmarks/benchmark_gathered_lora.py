"""Benchmark the gathered LoRA-experts op: Triton vs eager reference vs dense all-experts torch.

Full run (H100, Llama-2-7B FFN shapes, E=8, K=2, r=16, bf16, forward and forward+backward):

    PYTHONPATH=kernels python kernels/benchmarks/benchmark_gathered_lora.py

CPU smoke test through Triton's interpreter (tiny fp32 shapes, also checks the providers agree):

    TRITON_INTERPRET=1 PYTHONPATH=kernels python kernels/benchmarks/benchmark_gathered_lora.py --small

Times are CUDA-event medians after warm-up (perf_counter on CPU); inputs are fresh random
tensors, never zeros. Writes <out-dir>/gathered_lora_<tag>.csv and .json with the device,
versions and the exact command.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

if "--small" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401 - imported after TRITON_INTERPRET is decided

import _repo_paths  # noqa: E402,F401 - moelora and moelora_kernels without install
from moelora.bench.jsonio import write_json  # noqa: E402
from moelora.bench.output import write_csv  # noqa: E402
from moelora.bench.timing import percentile, time_ms  # noqa: E402
from moelora.bench.versions import record_versions  # noqa: E402
from moelora_kernels.gathered_lora import gathered_lora, gathered_lora_reference, segments  # noqa: E402

# mode -> (x per slot?, weighted output?)
MODES = {
    "shared-weighted": (False, True),  # LoRA-Switch linear; MixLoRA gate/up if fused
    "shared-perslot": (False, False),  # MixLoRA gate/up delta per selected expert
    "perslot-weighted": (True, True),  # MixLoRA down delta on each expert's own hidden
}


def dense_all_experts(x, lora_A, lora_B, idx, weight=None, scaling=1.0):
    """Baseline without gather: every expert on every token, masked by the routing (no sync).

    What a straightforward batched MoE-LoRA module does: 2E matmuls of full size in x.dtype.
    """
    T, K = idx.shape
    E = lora_A.shape[0]
    gate = (idx.unsqueeze(-1) == torch.arange(E, device=idx.device)).to(x.dtype) * scaling  # (T,K,E)
    if weight is not None:
        gate = gate * weight.to(x.dtype).unsqueeze(-1)
    shared_weighted = x.dim() == 2 and weight is not None
    if shared_weighted:
        gate = gate.sum(1)  # (T, E): one input, so the slots collapse before the matmuls
    xs = x if x.dim() == 3 else x.unsqueeze(1)
    out = None
    for e in range(E):
        ye = (xs @ lora_A[e].t()) @ lora_B[e].t()  # (T, Kx, OUT)
        term = ye[:, 0] * gate[:, e, None] if shared_weighted else ye * gate[..., e, None]
        out = term if out is None else out + term
    return out.sum(1) if weight is not None and not shared_weighted else out


_BASE_W: dict[tuple, torch.Tensor] = {}


def base_linear(x, lora_A, lora_B, idx, weight=None, scaling=1.0):
    """The frozen base projection W x of the same shape: the cost the LoRA delta adds to."""
    IN, OUT = lora_A.shape[2], lora_B.shape[1]
    key = (OUT, IN, x.dtype, x.device)
    if key not in _BASE_W:
        _BASE_W[key] = torch.randn(OUT, IN, device=x.device, dtype=x.dtype) / IN**0.5
    return torch.nn.functional.linear(x, _BASE_W[key])


_SORTED: list = []  # [(idx, its segments)]: the routing last sorted, kept alive so its identity holds


def segment_presorted(x, lora_A, lora_B, idx, weight=None, scaling=1.0):
    """The "segment" kernels with the slot order sorted once per routing, outside the timed calls:
    the serving step's form (``BatchPlan.memo`` sorts once for all the linears of a step), so the
    two kernels are timed without the sort that "triton-segment" pays in every call."""
    if not _SORTED or _SORTED[0][0] is not idx:
        _SORTED[:] = [(idx, segments(idx, lora_A.shape[0]))]
    return gathered_lora(x, lora_A, lora_B, idx, weight=weight, scaling=scaling, impl="segment",
                         segments=_SORTED[0][1])


PROVIDERS: dict[str, Callable] = {
    "triton": gathered_lora,  # impl="auto": gather for T <= 32, above tile (E*R <= 256) or segment
    # Both kernel families at every T, to place the auto threshold (DECODE_MAX_TOKENS).
    "triton-gather": functools.partial(gathered_lora, impl="gather"),
    "triton-tile": functools.partial(gathered_lora, impl="tile"),
    "triton-segment": functools.partial(gathered_lora, impl="segment"),  # many experts (serving stacks)
    "triton-segment-sorted": segment_presorted,  # the same, sorted once per routing (the serving step)
    "reference": gathered_lora_reference,
    "dense": dense_all_experts,
    "base-linear": base_linear,  # not a LoRA provider: the frozen linear for scale
}


def make_inputs(T, IN, OUT, E, R, K, per_slot, weighted, dtype, device, grad, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((T, K, IN) if per_slot else (T, IN), generator=g, device=device, dtype=dtype)
    A = torch.randn(E, R, IN, generator=g, device=device, dtype=dtype) / IN**0.5
    B = torch.randn(E, OUT, R, generator=g, device=device, dtype=dtype) / R**0.5
    idx = torch.rand(T, E, generator=g, device=device).topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g, device=device).softmax(-1) if weighted else None
    if grad:
        for t in (x, A, B, w):
            if t is not None:
                t.requires_grad_()
    return x, A, B, idx, w


def make_call(fn: Callable, inputs: tuple, grad: bool, dtype, device) -> Callable[[], object]:
    """One timed step: forward under no_grad, or forward + backward with a fixed random grad."""
    x, A, B, idx, w = inputs
    if not grad:
        def forward():
            with torch.no_grad():
                return fn(x, A, B, idx, w, 2.0)
        return forward
    gy = torch.randn(fn(x, A, B, idx, w, 2.0).shape, device=device, dtype=dtype)

    def forward_backward():
        for t in (x, A, B, w):
            if t is not None:
                t.grad = None
        fn(x, A, B, idx, w, 2.0).backward(gy)
    return forward_backward


def bench_one(provider, mode, T, IN, OUT, args, device, dtype):
    per_slot, weighted = MODES[mode]
    rows = []
    for pass_ in args.passes:
        grad = pass_ == "fwd+bwd"
        row = dict(mode=mode, T=T, IN=IN, OUT=OUT, E=args.experts, K=args.topk, R=args.rank,
                   dtype=str(dtype).replace("torch.", ""), pass_=pass_, provider=provider)
        try:
            inputs = make_inputs(T, IN, OUT, args.experts, args.rank, args.topk, per_slot,
                                 weighted, dtype, device, grad)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            call = make_call(PROVIDERS[provider], inputs, grad, dtype, device)
            # CUDA events around each call, recorded back to back (device time per call)
            ms = time_ms(call, args.warmup, args.reps, device, back_to_back=True)
            row.update(median_ms=statistics.median(ms), p20_ms=percentile(ms, 0.2), p80_ms=percentile(ms, 0.8))
            if device == "cuda":
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except torch.OutOfMemoryError as exc:  # record and go on: one provider's OOM is a result
            row.update(median_ms=float("nan"), error=f"OOM: {exc}".splitlines()[0])
        rows.append(row)
        inputs = call = None  # free before the next provider's peak-memory window
    return rows


def check_agreement(mode, T, IN, OUT, args, device, dtype) -> float:
    """Max |provider - reference| / max |reference| over the providers (forward)."""
    per_slot, weighted = MODES[mode]
    x, A, B, idx, w = make_inputs(T, IN, OUT, args.experts, args.rank, args.topk, per_slot,
                                  weighted, dtype, device, grad=False, seed=1)
    ref = gathered_lora_reference(x, A, B, idx, w, 2.0).float()
    errs = [(PROVIDERS[p](x, A, B, idx, w, 2.0).float() - ref).abs().max()
            for p in args.providers if p != "base-linear"]
    if not errs:
        return 0.0
    return float(max(errs) / ref.abs().max())


def environment(device: str) -> dict:
    return {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"), **record_versions()}


def print_table(rows: list[dict]) -> None:
    ref = {(r["mode"], r["T"], r["IN"], r["pass_"]): r["median_ms"] for r in rows
           if r["provider"] == "reference"}
    head = f"{'mode':17} {'T':>5} {'IN':>6} {'OUT':>6} {'pass':8} {'provider':13} {'median ms':>10} " \
           f"{'p20':>8} {'p80':>8} {'peak MB':>8} {'vs ref':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = ref.get((r["mode"], r["T"], r["IN"], r["pass_"]))
        speed = base / r["median_ms"] if base and r["median_ms"] == r["median_ms"] else float("nan")
        print(f"{r['mode']:17} {r['T']:>5} {r['IN']:>6} {r['OUT']:>6} {r['pass_']:8} {r['provider']:13} "
              f"{r['median_ms']:>10.4f} {r.get('p20_ms', float('nan')):>8.4f} "
              f"{r.get('p80_ms', float('nan')):>8.4f} {r.get('peak_mem_mb', float('nan')):>8.1f} "
              f"{speed:>6.2f}x")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes; CPU via TRITON_INTERPRET=1")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS),
                   help="default: all (--small: all but triton-gather, whose per-slot programs "
                        "crawl in the interpreter at T=40)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--tokens", nargs="+", type=int, help="T values (default 1 8 32 4096)")
    p.add_argument("--shapes", nargs="+", help="IN:OUT pairs (default 4096:11008 11008:4096)")
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("no CUDA: run with --small (sets TRITON_INTERPRET=1) or export TRITON_INTERPRET=1")
    if device == "cpu":
        torch.set_num_threads(1)  # tiny ops: intra-op threads only add spin contention (50x here)
    if args.small:
        # The interpreter runs every program in Python: keep this a smoke test (~30 s).
        tokens, shapes = args.tokens or [1, 40], args.shapes or ["42:123"]
        args.experts, args.rank = 4, 8
        args.providers = args.providers or [p_ for p_ in PROVIDERS if p_ != "triton-gather"]
        dtype_name, warmup, reps = args.dtype or "float32", 1, 2
    else:
        tokens, shapes = args.tokens or [1, 8, 32, 4096], args.shapes or ["4096:11008", "11008:4096"]
        dtype_name, warmup, reps = args.dtype or ("bfloat16" if device == "cuda" else "float32"), 10, 50
    args.providers = args.providers or list(PROVIDERS)
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.reps = args.reps if args.reps is not None else reps
    dtype = getattr(torch, dtype_name)
    if device == "cpu" and dtype == torch.bfloat16:
        p.error("bf16 arithmetic is broken in Triton's interpreter; use float32/float16 on CPU")

    rows, max_err = [], 0.0
    for mode in args.modes:
        for shape in shapes:
            IN, OUT = (int(v) for v in shape.split(":"))
            for T in tokens:
                max_err = max(max_err, check_agreement(mode, T, IN, OUT, args, device, dtype))
                for provider in args.providers:
                    rows.extend(bench_one(provider, mode, T, IN, OUT, args, device, dtype))
    print_table(rows)
    print(f"max relative forward disagreement with the reference: {max_err:.2e}")

    env = environment(device)
    tag = "small" if args.small else env["device"].replace(" ", "_")
    fields = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k)
                    if k in rows[0] else 99)
    csv_path = args.out_dir / f"gathered_lora_{tag}.csv"
    json_path = csv_path.with_suffix(".json")
    write_csv(csv_path, rows, fields)
    write_json(json_path, dict(environment=env, max_rel_disagreement=max_err,
                               settings=dict(warmup=args.warmup, reps=args.reps), results=rows), sort_keys=True)
    print(f"wrote {csv_path} and {json_path}")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if max_err > tol:
        raise SystemExit(f"providers disagree: {max_err:.2e} > {tol:.0e}")
    return rows


if __name__ == "__main__":
    main()
