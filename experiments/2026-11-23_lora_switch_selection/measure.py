"""How often does LoRA-Switch's token-wise selection change from one decode step to the next?

Merge mode pays for a full merge (all adapted weights rewritten) on every step whose selection
(experts AND gate weights) differs from the previous step; unchanged selections are skipped
in-kernel. This measures that share on real prompts, for a router trained on the synthetic suite
and for the same adapter with its freshly initialised router, on CPU (the routing does not depend
on the device). Selections are read from the router at each decode step (unmerged mode, so no
merge has to run on the CPU; merge mode would merge exactly these):

    python experiments/2026-11-23_lora_switch_selection/measure.py --adapter <run>/adapter \
        --out experiments/2026-11-23_lora_switch_selection

Per prompt set it reports: steps (decode steps recorded), ``selection_changed`` (experts or
weights differ: a merge), ``experts_changed`` (the expert set differs), and the same for top-1
routing of the same router (weights renormalise to exactly 1.0, so an unchanged expert is a skip).
Writes results.json and results.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import torch

import moelora
from moelora.data.synthetic import make_synthetic_suite
from moelora import switch_state
from moelora.models import load_base_model

NATURAL = [
    "The history of the printing press begins",
    "Explain in simple words why the sky is blue:",
    "Write a short list of tips for learning a new language:",
    "def fibonacci(n):",
    "Question: What is the capital of France? Answer:",
    "Once upon a time, in a small village by the sea,",
]


def change_rates(model, tok, prompts: list[str], new_tokens: int, top_k: int) -> dict:
    """Decode-step selections are read from the layer-0 router's output (the routing that merge
    mode would merge), with the model in unmerged mode so that no merge has to run on the CPU."""
    state = switch_state(model)
    router = model.model.layers[0].router
    old_k, old_mode = router.top_k, state.mode
    router.top_k, state.mode = top_k, "unmerged"
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, routing):
        if routing.experts.shape[0] == 1:  # one token at batch 1: a decode step
            steps.append((routing.experts[0].clone(), routing.weights[0].clone()))

    handle = router.register_forward_hook(record)
    pairs = sel = exp = 0
    try:
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            steps.clear()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
            for (e0, w0), (e1, w1) in zip(steps, steps[1:]):
                pairs += 1
                sel += not (torch.equal(e0, e1) and torch.equal(w0, w1))
                exp += not torch.equal(torch.sort(e0).values, torch.sort(e1).values)
    finally:
        handle.remove()
        router.top_k, state.mode = old_k, old_mode
    return {"steps": pairs, "selection_changed": sel / max(pairs, 1), "experts_changed": exp / max(pairs, 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a LoRA-Switch adapter folder (moelora.save_adapter)")
    ap.add_argument("--base", default="smollm2", help="base model name or folder (default: SmolLM2-135M wheel)")
    ap.add_argument("--n-per-task", type=int, default=8, help="synthetic test prompts per task")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    suite = make_synthetic_suite(n_train=0, n_test=a.n_per_task, seed=0)
    sets = {"synthetic test prompts": [ex["prompt"] for t in suite.values() for ex in t["test"]],
            "natural-language prompts": NATURAL}
    rows = []
    for router_kind in ("trained", "initial"):
        model, tok = load_base_model(a.base)
        moelora.load_adapter(model, a.adapter)
        cfg = moelora.get_adapter_config(model)
        if router_kind == "initial":  # the same experts, the router as inject_adapter draws it
            torch.manual_seed(0)
            fresh = moelora.inject_adapter(load_base_model(a.base)[0], cfg)
            model.model.layers[0].router.load_state_dict(fresh.model.layers[0].router.state_dict())
        model.eval()
        for name, prompts in sets.items():
            for k in sorted({cfg.top_k, 1}, reverse=True):
                r = change_rates(model, tok, prompts, a.new_tokens, k)
                rows.append({"router": router_kind, "prompts": name, "n_prompts": len(prompts), "top_k": k, **r})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
           "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
           "adapter_config": moelora.get_adapter_config(model).to_dict()}
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
