"""Build summary.md and results.json of this experiment from the bench.json files of each run.

    python experiments/2026-11-23_decode_latency/summarize.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
# Session 1: one-launch kernels, torch reference traced under compile (run4_static) or Triton
# source traced (run5). Session 2: kernels as custom ops, split forms in CUDA graphs (run7+), tuned
# tiles (run8+), no routing records under compile and a reused static cache (run9+).
RUNS = ["run3_eager", "run4_eager", "run4_static", "run5_static_compiled_kernels", "run7_static_split",
        "run8_eager", "run8_static", "run9_static_b1_128tok", "run10_eager", "run10_static_b8_b32"]


def main() -> None:
    rows = []
    for run in RUNS:
        data = json.loads((HERE / run / "bench.json").read_text())
        ref = {(r["mode"], r["batch_size"]): r["decode_ms_per_token"] for r in data["rows"]
               if r["method"] == "reference_mixlora" and not r.get("error")}
        for r in data["rows"]:
            if r.get("error"):
                continue
            ms = r["decode_ms_per_token"]
            ref_eager = ref.get(("eager", r["batch_size"]))
            rows.append({
                "run": run, "method": r["method"], "mode": r["mode"], "batch": r["batch_size"],
                "new_tokens": r["new_tokens"],
                "decode_ms_per_token": round(ms, 2), "step_ms_p50": round(r["step_ms_p50"], 2),
                "x_base_same_mode": round(r["decode_ratio"], 2),
                "reference_speedup": round(ref_eager / ms, 2) if ref_eager and r["method"] != "reference_mixlora" else None,
                "selection_change_rate": r.get("selection_change_rate"),
            })
        env = data["environment"]
    lines = [f"Device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
             f"triton {env.get('triton')} | bf16 | Llama-2-7B shape (random weights), prompt 64, "
             "median of 3 repeats", "",
             "| run | method | mode | batch | new tokens | ms/token | p50 step ms | × base (same run, mode) | × faster than reference (eager, same run) | selection changed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['mode']} | {r['batch']} | {r['new_tokens']} | {r['decode_ms_per_token']} | "
                     f"{r['step_ms_p50']} | {r['x_base_same_mode']} | {r['reference_speedup'] or ''} | "
                     f"{'' if r['selection_change_rate'] is None else r['selection_change_rate']} |")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
