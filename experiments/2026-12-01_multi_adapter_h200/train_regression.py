"""Issue 14's no-regression row for training: one full-model training step (forward, backward,
clip, AdamW) of a single adapter, through only the public API that the pre-redesign tree
(1feacf1) and the current tree share (``moelora.inject_adapter`` with a config), so the same
file runs against either: ``PYTHONPATH=<tree>:<tree>/kernels python train_regression.py``.

Llama-2-7B shape (32 layers, random bf16 weights, built on the GPU), bf16 autocast, fp32 adapter,
batch x seq tokens; per method: ``--warmup`` untimed steps, then ``--steps`` timed ones (device
synchronised around each), median / min ms and tokens/s, peak memory; one JSON line per method."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(layers: int, device: str, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4) if small else \
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096, **dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
    return model


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step_times(model, method: str, batch: int, seq: int, warmup: int, steps: int, plain: bool = False) -> dict:
    import moelora

    dev = next(model.parameters()).device
    cfg = (moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05) if method == "lora" else
           moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.05))
    moelora.inject_adapter(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(3, 32000, (batch, seq), device=dev, generator=g)
    model.train()
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        with _plain(plain):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    moelora.remove_adapter(model)
    ms = statistics.median(times) * 1e3
    method = method + ("_plain_backward" if plain else "")
    return {"method": method, "ms_median": round(ms, 2), "ms_min": round(min(times) * 1e3, 2),
            "tokens_per_s": round(batch * seq / (ms / 1e3), 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
            "trainable": sum(p.numel() for p in params)}


def _plain(on: bool):
    """The current tree's ``plain_mixture_backward`` (MixLoRA without the mixture recompute); the
    pre-redesign tree has no such switch (it never recomputed)."""
    import contextlib

    if not on:
        return contextlib.nullcontext()
    from moelora.layers.dispatch import plain_mixture_backward

    return plain_mixture_backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="lora,mixlora")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--label", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a 64-wide model (a CPU smoke run of this script)")
    ap.add_argument("--plain-backward", action="store_true",
                    help="also each method under plain_mixture_backward (current tree only: no MixLoRA recompute)")
    a = ap.parse_args()
    import moelora

    model = build(a.layers, a.device, a.small)
    for method in a.methods.split(","):
        for plain in ((False, True) if a.plain_backward else (False,)):
            row = step_times(model, method, a.batch, a.seq, a.warmup, a.steps, plain)
            print(json.dumps({"label": a.label, "moelora_file": moelora.__file__, **row}), flush=True)


if __name__ == "__main__":
    main()
