"""What a training forward saves for backward, per decoder layer and token, by method.

Counts every tensor that autograd packs during one training forward (saved_tensors_hooks), by
unique storage (a view keeps its whole storage alive), excluding parameters and frozen weights;
attributes each to the innermost module running when it was saved. Reduced Llama of Llama-2-7B
width ratios (hidden 512, ffn 1376, 8 heads, 2 layers). Torch paths run in bf16; the Triton path
(TRITON_INTERPRET=1 on CPU) in fp16, the same element size.

    TRITON_INTERPRET=1 python experiments/2026-12-02_mixlora_training_memory/measure_saved.py [--dropout 0.05] [--detail]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import transformers as tf

import moelora
from moelora.layers.dispatch import plain_mixture_backward


def base_model(dtype):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return tf.LlamaForCausalLM(cfg).to(dtype)


def build(method, dtype, dropout):
    m = base_model(dtype)
    if method == "peft_lora":
        import peft
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        m = peft.get_peft_model(m, cfg)
    elif method == "lora":
        m = moelora.inject_adapter(m, moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout))
    else:  # mixlora, or mixlora_plain: the composition before _MixRecompute (its eager twin, see measure)
        m = moelora.inject_adapter(m, moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32,
                                                            lora_dropout=dropout, expert_backend="fused"))
    for p in m.parameters():  # B starts at zero: give the adapters values (not needed for counting)
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.02)
    return m.train()


def measure(method, dtype, dropout, backend, tokens=(2, 128), detail=False):
    m = build(method, dtype, dropout)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in m.buffers()}
    stack = ["<outside>"]
    names = {mod: n for n, mod in m.named_modules()}

    def pre(mod, *a, **k):
        stack.append(names[mod])

    def post(mod, *a, **k):
        stack.pop()

    hs = [mod.register_forward_pre_hook(pre) for mod in m.modules()]
    hs += [mod.register_forward_hook(post, always_call=True) for mod in m.modules()]
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in params and ptr not in seen and st.nbytes() > 0:
                seen[ptr] = (st.nbytes(), stack[-1], tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    B, T = tokens
    ids = torch.randint(0, 256, (B, T))
    plain = plain_mixture_backward(method == "mixlora_plain")  # mixlora_plain: no recompute in backward
    with plain, moelora.kernel_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(input_ids=ids, labels=ids)
        loss = out.loss
    with moelora.kernel_backend(backend):
        loss.backward()
    for h in hs:
        h.remove()
    N = B * T
    per_layer = collections.Counter()
    rows = collections.Counter()
    for nbytes, where, shape, dt in seen.values():
        layer = next((p for p in where.split(".") if p.isdigit()), None)
        if layer is not None and ".layers." in where:
            per_layer[layer] += nbytes
            short = where.split(f".layers.{layer}.")[1]
            rows[(short, shape, dt)] += nbytes
    L = len(per_layer)
    total = sum(per_layer.values()) / L / N
    res = {"method": method, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "dropout": dropout,
           "bytes_per_token_per_layer": round(total, 1)}
    if detail:
        res["top"] = [(k[0], k[1], k[2], round(v / L / N, 1)) for k, v in rows.most_common(14)]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--detail", action="store_true")
    ap.add_argument("--methods", default="peft_lora,lora,mixlora_plain,mixlora")
    ap.add_argument("--no-triton", action="store_true")
    a = ap.parse_args()
    out = []
    for method in a.methods.split(","):
        out.append(measure(method, torch.bfloat16, a.dropout, "torch", detail=a.detail))
        if method != "peft_lora" and not a.no_triton and os.environ.get("TRITON_INTERPRET") == "1":
            out.append(measure(method, torch.float16, a.dropout, "triton", detail=a.detail))
    for r in out:
        print(json.dumps(r))
    base = out[0]["bytes_per_token_per_layer"]
    print("\n| method | path | dtype | dropout | saved bytes / token / layer | x PEFT |")
    print("|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['method']} | {r['backend']} | {r['dtype']} | {r['dropout']} | {r['bytes_per_token_per_layer']:.0f} "
              f"| {r['bytes_per_token_per_layer'] / base:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
