"""CPU estimate of the GPU time of the study's packed training steps and evaluations.

Eager training of a 135M model on an H200 is launch-bound: the time of a step is about its
number of aten ops (each ~ one kernel launch) times the host cost per op. The H200 measured
0.25 s for a 14.8k-op solo LoRA step of SmolLM2's shape (experiments/2026-12-02_concurrent_
training: ~17 us/op), so this script counts ops (they do not depend on the device or the
token count) for one packed step of each stage's concurrent group, and for one greedy-generation
forward (prefill and one decode step) per method, on SmolLM2's shape with random weights; and
the bytes autograd saves per packed token (for the GPU memory of a step).

    python experiments/2026-12-02_accuracy_study/estimate.py [--us-per-op 17] [--out estimate.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import moelora
from moelora.bench.concurrent_training import _CountOps
from moelora.bench.saved_tensors import SavedStorages
from moelora.models import build_tiny_model
from moelora.training.packing import pack_micro_batches, per_job_losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budgets import arms  # noqa: E402

METHOD_ARMS = ["lora", "mixlora", "mixloradyn", "loraswitch", "bdlora", "bdmixlora"]


def smollm2_shape():
    return build_tiny_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                            num_heads=9, num_kv_heads=3, head_dim=64).requires_grad_(False)


def batch(rows: int, seq: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def packed_step(model, names: list[str], rows: int, seq: int) -> dict:
    micro = [batch(rows, seq, model.config.vocab_size, i) for i in range(len(names))]
    packed = pack_micro_batches(micro, names, 0, "cpu", pad_to_multiple_of=64 if len(names) > 1 else None)
    model.train()
    counter = _CountOps()
    t0 = time.perf_counter()
    with SavedStorages(model) as saved, counter:
        out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, adapter_names=packed.adapter_names)
        aux = getattr(out, "aux_losses", None) or {}
        total = sum(l + aux[n].to(l.dtype) if n in aux else l for n, l in zip(names, per_job_losses(out.logits, packed)))
        total.backward()
    model.zero_grad(set_to_none=True)
    return {"ops": counter.n, "saved_bytes": saved.nbytes, "tokens": int(packed.input_ids.numel()),
            "cpu_s": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def generation_ops(model, name: str, rows: int = 4, prompt: int = 12) -> dict:
    model.eval()
    ids = torch.randint(5, 1000, (rows, prompt))
    with moelora.use_adapter(model, name):
        c = _CountOps()
        with c:
            out = model(input_ids=ids, use_cache=True)
        prefill = c.n
        c = _CountOps()
        with c:
            model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        decode = c.n
    return {"prefill_ops": prefill, "decode_ops": decode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--us-per-op", type=float, default=17.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    table = arms()
    model = smollm2_shape()
    groups = {
        "stage1 (6 methods x 3 LRs, budget S)": [f"{m}_s" for m in METHOD_ARMS for _ in range(3)],
        "stage2 wave (6 methods x 2 budgets, one seed)": [f"{m}_{b}" for m in METHOD_ARMS for b in ("s", "l")],
        "solo lora_s": ["lora_s"],
    }
    report = {"us_per_op": a.us_per_op, "groups": {}, "generation": {}}
    for label, arm_list in groups.items():
        names = []
        for i, arm in enumerate(arm_list):
            name = f"j{i}_{arm}"
            cfg = moelora.config_from_dict(dict(table[arm]))
            if not names:
                model = moelora.inject_adapter(model, cfg, adapter_name=name)
            else:
                moelora.add_adapter(model, name, cfg)
            names.append(name)
        r = packed_step(model, names, rows=2, seq=16)
        r["est_gpu_s_per_step"] = round(r["ops"] * a.us_per_op * 1e-6, 3)
        r["saved_bytes_per_token"] = round(r["saved_bytes"] / r["tokens"])
        report["groups"][label] = r
        print(label, json.dumps(r), flush=True)
        if label.startswith("stage2"):
            for name in names:
                g = generation_ops(model, name)
                report["generation"][name.split("_", 1)[1]] = g
                print("  generate", name, json.dumps(g), flush=True)
        moelora.remove_adapter(model)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
