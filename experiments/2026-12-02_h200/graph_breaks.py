"""Graph breaks and recompiles of the compiled decode step (issue 14, call 2 of this session).

The 32-layer compiled mixed-batch run of call 1 hit dynamo's recompile limit in LlamaAttention
(a graph break at v_proj, then one recompile per layer_idx); the CPU recording-backend test sees
one graph. This prints, on the GPU, the graph-break reasons and graph counts per case of a
4-layer Llama-2-7B-shape model with 8 LoRA adapters, compiled the way generate compiles it.

    TORCH_LOGS=graph_breaks,recompiles python experiments/2026-12-02_h200/graph_breaks.py
"""
import collections
import sys

import torch
from transformers import StaticCache

import moelora
from moelora.bench.models import build_shape_model, randomize_adapter_

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
layers = int(sys.argv[1]) if len(sys.argv) > 1 else 4
dev = "cuda" if torch.cuda.is_available() else "cpu"
model, _ = build_shape_model("llama2_7b_shape" if dev == "cuda" else "tiny_shape",
                             "bfloat16" if dev == "cuda" else "float32", dev, 0, num_hidden_layers=layers)
names = [f"a{i}" for i in range(8)]
for i, n in enumerate(names):
    cfg = moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS)
    (moelora.inject_adapter(model, cfg, adapter_name=n) if i == 0 else moelora.add_adapter(model, n, cfg))
randomize_adapter_(model, 0)
model.eval()
ids = torch.randint(3, model.config.vocab_size, (8, 16), device=dev)
cache = StaticCache(config=model.config, max_cache_len=40)


def gen(**kw):
    cache.reset()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                       max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


from torch._dynamo.utils import counters  # noqa: E402

for case in ("base", "single", "mixed"):
    before = collections.Counter(counters["stats"])
    breaks = collections.Counter(counters["graph_break"])
    if case == "base":
        with moelora.disable_adapter(model):
            gen()
    else:
        gen(adapter_names=[names[0]] * 8 if case == "single" else names)
    print(f"CASE {case}: unique_graphs +{counters['stats']['unique_graphs'] - before['unique_graphs']}, "
          f"graph breaks +{sum(counters['graph_break'].values()) - sum(breaks.values())}", flush=True)
    for reason, n in (collections.Counter(counters["graph_break"]) - breaks).items():
        print(f"   break x{n}: {reason[:400]}", flush=True)
