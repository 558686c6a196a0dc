"""MixLoRA expert block: training throughput (forward + backward) of the fused path vs the eager
reference, with a gradient-equality check, plus decode-size forward times.

    python kernels/benchmarks/benchmark_mixlora_block.py --tokens 4096 --out results_dir
    python kernels/benchmarks/benchmark_mixlora_block.py --small          # CPU smoke test

The block is one Llama-2-7B FFN (d 4096, ffn 11008, bf16) wrapped as a MixLoRA MoE of 8 LoRA
experts, top-2, r=16. Timing: CUDA events, warm-up, median of repeats (docs/anchors.md method).
Writes JSON + CSV with the device, versions and the exact command.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import _repo_paths  # noqa: F401 - moelora and moelora_kernels without install
from moelora.bench.jsonio import write_json
from moelora.bench.output import write_csv
from moelora.bench.timing import median_ms as _timer  # median ms of fn(): CUDA events, warm-up first
from moelora.bench.versions import record_versions


def build_block(d: int, ffn: int, experts: int, top_k: int, rank: int, dtype, device):
    """One Llama FFN (frozen, N(0, 0.02)) as a MixLoRA MoE: the MLP of a one-layer Llama adapted
    with ``moelora.inject_adapter`` (public API; no LoRA on attention). ``set_backend`` picks the
    fused or the eager expert path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import moelora

    torch.manual_seed(0)
    heads = max(1, d // 128)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=1, vocab_size=8,
                                         num_attention_heads=heads, num_key_value_heads=heads)).to(device, dtype)
    for p in model.model.layers[0].mlp.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = moelora.MixLoraConfig(num_experts=experts, top_k=top_k, r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                attention_target_modules=())
    moelora.inject_adapter(model, cfg)
    block = model.model.layers[0].mlp
    with torch.no_grad():  # non-zero B so the deltas (and their gradients) are real
        for e in block.experts.values():
            e.lora_B.normal_(std=0.02)
        block.router.weight.normal_(std=0.5)  # heterogeneous routing
    return block


def set_backend(block, backend: str) -> None:
    """The expert path of ``block``'s MixLoRA adapter: fused (Triton kernels) or eager (torch)."""
    for adapter in block.adapters.values():
        adapter.backend = backend


def _profile(step, backend: str, out: str) -> None:
    """Kernel table (by GPU time) of three training steps: where the fwd+bwd time goes."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"profile_train_{backend}.txt"), "w") as f:
        f.write(f"3 training steps (fwd+bwd), backend={backend}\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=100))


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = build_block(args.d, args.ffn, args.experts, args.top_k, args.rank, dtype, device)
    params = [p for p in block.parameters() if p.requires_grad]
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, args.tokens, args.d, generator=g, device=device, dtype=dtype)
    dy = torch.randn(1, args.tokens, args.d, generator=g, device=device, dtype=dtype)

    grads = {}
    for backend in ("eager", "fused"):
        set_backend(block, backend)

        def step():
            for p in params:
                p.grad = None
            xi = x.detach().requires_grad_(True)
            block(xi).backward(dy)
            return xi

        xi = step()
        grads[backend] = [xi.grad.float()] + [p.grad.float() for p in params]
        ms = _timer(step, args.warmup, args.reps)
        rows.append({"what": "train_fwd_bwd", "backend": backend, "tokens": args.tokens, "ms": ms,
                     "tokens_per_s": args.tokens / ms * 1e3})
        with torch.no_grad():
            for n in args.decode_tokens:
                xs = x[:, :n]
                ms = _timer(lambda: block(xs), args.warmup, args.reps)
                rows.append({"what": "forward_inference", "backend": backend, "tokens": n, "ms": ms,
                             "tokens_per_s": n / ms * 1e3})
        if args.profile and args.out:
            _profile(step, backend, args.out)
    errs = [((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads["fused"], grads["eager"])]
    speed = {r["backend"]: r["tokens_per_s"] for r in rows if r["what"] == "train_fwd_bwd"}
    summary = {"train_speedup_fused_vs_eager": speed["fused"] / speed["eager"],
               "max_rel_grad_err": max(errs), "target_speedup": 2.0}
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--decode-tokens", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also write torch.profiler kernel tables to --out")
    args = ap.parse_args()
    if args.small:
        args.tokens, args.d, args.ffn, args.warmup, args.reps = 64, 32, 48, 1, 2
        args.decode_tokens = [1, 4]
    rows, summary = run(args)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **record_versions()}
    print(f"{'what':<18} {'backend':<7} {'tokens':>6} {'ms':>9} {'tokens/s':>12}")
    for r in rows:
        print(f"{r['what']:<18} {r['backend']:<7} {r['tokens']:>6} {r['ms']:>9.3f} {r['tokens_per_s']:>12.0f}")
    print(json.dumps(summary), json.dumps(meta))
    if args.out:
        write_json(os.path.join(args.out, "mixlora_block.json"), {"rows": rows, "summary": summary, "meta": meta})
        write_csv(os.path.join(args.out, "mixlora_block.csv"), rows, list(rows[0]))


if __name__ == "__main__":
    main()
