"""Trainable parameters of every arm of the study on SmolLM2-135M's shape (exact: each config is
injected into random 1- and 2-layer models of SmolLM2's widths and extrapolated to its 30 layers). Prints a table and checks that each arm is within 10% of its budget's LoRA arm.

    python experiments/2026-12-02_accuracy_study/budgets.py [--search]

--search lists, for the block-diagonal arms, the largest rank (multiple of nblocks) within the
LoRA arm's parameters (how their ranks in conf/arm/*.yaml were chosen; as moelora.rank_for_budget
does per linear)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

import moelora
from moelora.models import build_tiny_model

HERE = Path(__file__).resolve().parent
LAYERS = 30  # SmolLM2-135M: hidden 576, FFN 1536, 9 heads / 3 KV heads of 64, 30 layers


def smollm2_layers(n: int):
    return build_tiny_model("llama", vocab_size=128, hidden_size=576, intermediate_size=1536, num_layers=n,
                            num_heads=9, num_kv_heads=3, head_dim=64)


def count(adapter: dict) -> int:
    """Exact for SmolLM2's 30 layers: c(1) + 29 (c(2) - c(1)) (per-layer parameters, plus the ones
    a method has once, e.g. LoRA-Switch's single router)."""
    cfg = moelora.config_from_dict(dict(adapter))
    c1, c2 = (moelora.trainable_parameters(moelora.inject_adapter(smollm2_layers(n), cfg))["trainable"] for n in (1, 2))
    return c1 + (LAYERS - 1) * (c2 - c1)


def arms() -> dict[str, dict]:
    """arm name -> its adapter dict (the conf/adapter default with the arm's keys over it)."""
    conf = HERE.parent.parent / "conf" / "adapter"
    out = {}
    for path in sorted((HERE / "conf" / "arm").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        group = next(d["override /adapter"] for d in spec["defaults"] if isinstance(d, dict) and "override /adapter" in d)
        adapter = yaml.safe_load((conf / f"{group}.yaml").read_text())
        adapter.update(spec.get("adapter") or {})
        out[path.stem] = adapter
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", action="store_true")
    a = p.parse_args()
    rows, ok = [], True
    table = arms()
    for name, adapter in table.items():
        rows.append((name, adapter, count(adapter)))
    base = {n.rsplit("_", 1)[1]: c for n, _, c in rows if n.startswith("lora_") and n.count("_") == 1}
    print(f"| arm | method | r | experts | nblocks | trainable | / LoRA arm |\n|---|---|---|---|---|---|---|")
    for name, adapter, c in rows:
        ratio = c / base[name.rsplit("_", 1)[1]]
        ok &= 0.9 <= ratio <= 1.1
        print(f"| {name} | {adapter['method']} | {adapter['r']} | {adapter.get('num_experts', '')} | "
              f"{adapter.get('nblocks', '')} | {c:,} | {ratio:.3f} |")
    if a.search:
        for name, adapter, _ in rows:
            n = int(adapter.get("nblocks") or 1)
            if n == 1:
                continue
            budget = base[name.rsplit("_", 1)[1]]
            best = max(r for r in range(n, 200, n) if count({**adapter, "r": r}) <= budget)
            print(f"{name}: largest r within {budget:,} = {best} ({count({**adapter, 'r': best}):,})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
