"""Collect the bench.json files of this experiment into summary.md, results.json and a plot.

    python experiments/2026-12-01_decode_graphs_h200/summarize.py

Every number comes from the JSON files beside this script (written on the GPU machine by
``python -m moelora.eval.latency`` and ``kernels/benchmarks/benchmark_merge.py``); nothing is typed in.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {  # file -> what changed before it (see README)
    "call1_static_b1.json": "side-stream adapter kernels (compiled); no eager graphs yet",
    "call1_eager_b1_nographs.json": "eager, before decode graphs",
    "call2_eager_broken_capture.json": "eager with decode graphs; LoRA valid, MixLoRA captures failed (pool bug)",
    "call2_static_b8.json": "static b8 (b32 cut by the time budget)",
    "call3_eager.json": "eager with decode graphs",
    "call3_static_b8_b32.json": "static b8/b32",
    "call4_eager.json": "eager with decode graphs, LoRA-Switch merge mode without the router graph",
}


def _rows():
    for name, note in RUNS.items():
        d = json.loads((HERE / name).read_text())
        for r in d["rows"]:
            if r.get("decode_ms_per_token") is None:
                continue
            yield name.removesuffix(".json"), note, d["environment"], r


def main() -> None:
    rows = list(_rows())
    env = rows[0][2]
    ref = {(run, r["batch_size"]): r["decode_ms_per_token"] for run, _, _, r in rows if r["method"] == "reference_mixlora"}
    lines = [f"Device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | "
             f"triton {env['triton']} | Llama-2-7B shape, random bf16 weights, prompt 64", "",
             "| run | method | mode | batch | new tokens | ms/token | × base (same run) | × faster than reference | graphs |",
             "|---|---|---|---|---|---|---|---|---|"]
    out = []
    for run, _, _, r in rows:
        speed = ref.get((run, r["batch_size"]))
        vs_ref = round(speed / r["decode_ms_per_token"], 2) if speed and r["method"] != "reference_mixlora" else ""
        lines.append(f"| {run} | {r['method']} | {r['mode']} | {r['batch_size']} | {r['new_tokens']} | "
                     f"{r['decode_ms_per_token']:.2f} | {r['decode_ratio']:.2f} | {vs_ref} | {r.get('decode_graphs', '')} |")
        out.append({"run": run, **{k: r.get(k) for k in ("method", "mode", "batch_size", "new_tokens",
                                                          "decode_ms_per_token", "decode_ratio", "decode_graphs")},
                    "x_faster_than_reference": vs_ref or None})
    merge = {}
    for name in ("call4_merge.json", "call5_merge_sweep.json"):
        d = json.loads((HERE / name).read_text())
        best = next((r for r in d["rows"] if r.get("best")), {})
        merge[name] = {**{k: d[k] for k in ("merge_ms", "merge_GB_per_s", "copy_GB_per_s", "merge_frac_of_copy_bw")},
                       "best": best.get("provider")}
        lines += ["", f"Merge kernel ({name}, {d['device']}, best {best.get('provider')}): {d['merge_ms']:.2f} ms = "
                      f"{d['merge_GB_per_s']:.0f} GB/s = {100 * d['merge_frac_of_copy_bw']:.0f}% of the copy bandwidth "
                      f"({d['copy_GB_per_s']['same_bytes']:.0f} GB/s; target >= {100 * d['target_frac']:.0f}%)"]
        lines += [f"  {r['provider']}: {r['ms']:.2f} ms" for r in d["rows"] if r["provider"].startswith(("torch", "triton_skip"))]
    block = json.loads((HERE / "call1_mixlora_block.json").read_text())
    lines += ["", f"MixLoRA expert block fwd+bwd at 4096 tokens, fused vs eager: {block['summary']['train_speedup_fused_vs_eager']:.2f}× "
                  f"(max relative gradient difference {block['summary']['max_rel_grad_err']:.1e}, bf16)"]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps({"environment": env, "rows": out, "merge": merge,
                                                   "mixlora_block": block["summary"]}, indent=1) + "\n")
    _plot(out)
    print("\n".join(lines))


def _plot(rows) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    eager = [r for r in rows if r["mode"] == "eager" and r["run"] in ("call3_eager", "call4_eager")
             and r["method"] != "base"]
    methods = sorted({r["method"] for r in eager})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, m in enumerate(methods):
        pts = [(r["batch_size"], r["decode_ratio"], r["run"]) for r in eager if r["method"] == m]
        for b, v, run in pts:
            ax.scatter([b * (1 + 0.06 * (i - len(methods) / 2))], [v], marker="o" if run == "call3_eager" else "s",
                       color=f"C{i}", label=m if (b, run) == (pts[0][0], pts[0][2]) else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode time / base (eager)")
    ax.set_title("Eager decode on the H200 with decode graphs (○ call 3, □ call 4)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "eager_ratio_to_base.png", dpi=120)


if __name__ == "__main__":
    main()
