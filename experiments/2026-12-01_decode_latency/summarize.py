"""Tables and plots of this experiment from the files the GPU calls returned (no GPU needed).

    python experiments/2026-12-01_decode_latency/summarize.py

Writes summary.md (every case of every call: medians over rounds, per-round range, best repeat,
paired ratios), results.json (the same rows plus the targets), eager_b1_ratios.png (ratio to the
base per call, with the per-round range) and call2_host_noise.png (call 2's per-repeat decode
times against the host probe and the GPU clock on one time axis).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALLS = {  # run folder -> (the code's commit, what changed for it)
    "call1_eager_b1": ("fcc3b88", "rounds"), "call1_eager_b8_b32": ("fcc3b88", "rounds"),
    "call2_eager_b1": ("86be166", "rounds + best-of"), "call2_static_b32": ("86be166", "8-warp tiles"),
    "call3_eager_b1": ("51bfeed", "rounds + paired"), "call3_eager_b8_b32": ("51bfeed", "rounds + paired"),
    "call5_static_b32": ("68709e7", "4-warp tiles from 16 tokens"),
}
FIELDS = ("decode_ms_per_token", "decode_ms_best", "decode_ratio", "decode_ratio_min", "decode_ratio_max",
          "decode_ratio_paired", "decode_ratio_paired_min", "decode_ratio_paired_max", "decode_ratio_best",
          "reference_speedup", "reference_speedup_min", "reference_speedup_max", "reference_speedup_paired",
          "reference_speedup_paired_min", "reference_speedup_paired_max", "reference_speedup_best", "harness_ratio",
          "rounds", "decode_graphs")


def load_rows() -> tuple[list[dict], dict]:
    rows, env = [], {}
    for run, (commit, note) in CALLS.items():
        data = json.loads((HERE / run / "bench.json").read_text())
        env = env or data["environment"]
        for r in data.get("summary") or data["rows"]:
            if r.get("error"):
                continue
            row = {"run": run, "commit": commit, "method": r["method"], "mode": r["mode"], "batch": r["batch_size"],
                   "new_tokens": r["new_tokens"], **{k: r.get(k) for k in FIELDS}}
            row["rounds"] = row["rounds"] or 1
            row["command"] = data["environment"]["command"]
            rows.append(row)
    return rows, env


def fmt(v, nd=2) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def rng(r: dict, key: str) -> str:
    v = fmt(r.get(key))
    if v and r.get(f"{key}_min") is not None and r["rounds"] > 1:
        v += f" [{r[f'{key}_min']:.2f}–{r[f'{key}_max']:.2f}]"
    return v


def table(rows: list[dict]) -> list[str]:
    head = ("run", "method", "mode", "B", "ms/token", "best", "× base [rounds]", "× base paired", "× base best",
            "× faster than ref [rounds]", "paired", "best", "harness/HF")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["run"], r["method"], r["mode"], str(r["batch"]), fmt(r["decode_ms_per_token"]), fmt(r["decode_ms_best"]),
            rng(r, "decode_ratio"), rng(r, "decode_ratio_paired"), fmt(r["decode_ratio_best"]),
            rng(r, "reference_speedup") if r["method"] != "reference_mixlora" else "",
            rng(r, "reference_speedup_paired") if r["method"] != "reference_mixlora" else "",
            fmt(r["reference_speedup_best"]) if r["method"] != "reference_mixlora" else "",
            fmt(r["harness_ratio"], 3)]) + " |")
    return out


def kernel_sweep() -> list[str]:
    rows = list(csv.DictReader((HERE / "call5_tiles" / "decode_kernels.csv").open()))
    cfgs = sorted({r["config"] for r in rows if r["config"]})
    cases: dict[tuple, dict] = {}
    for r in rows:
        if r["config"]:
            cases.setdefault((r["T"], r["case"]), {})[r["config"]] = float(r["us"])
    short = [c.replace("c256 ", "").replace(" pauto", "") for c in cfgs]
    out = ["| T | case (µs per call, CUDA-graph replay) | " + " | ".join(short) + " |", "|" + "---|" * (len(cfgs) + 2)]
    for (T, case), v in cases.items():
        best = min(v.values())
        cells = [(f"**{v[c]:.2f}**" if v[c] == best else f"{v[c]:.2f}") for c in cfgs]
        out.append(f"| {T} | {case} | " + " | ".join(cells) + " |")
    return out


def plot_eager(rows: list[dict]) -> None:
    from matplotlib.figure import Figure

    eager = [r for r in rows if r["mode"] == "eager" and r["batch"] == 1 and r["method"] != "base"]
    methods = sorted({r["method"] for r in eager}, key=lambda m: (m == "reference_mixlora", m))
    runs = sorted({r["run"] for r in eager})
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        labelled = False
        for i, m in enumerate(methods):
            r = next((x for x in eager if x["run"] == run and x["method"] == m), None)
            if r is None:
                continue
            lo, hi = r.get("decode_ratio_min") or r["decode_ratio"], r.get("decode_ratio_max") or r["decode_ratio"]
            ax.bar(i + j * width, r["decode_ratio"], width, color=f"C{j}", label=None if labelled else run)
            labelled = True
            ax.errorbar(i + j * width, r["decode_ratio"], yerr=[[r["decode_ratio"] - lo], [hi - r["decode_ratio"]]],
                        color="k", capsize=3, lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=15)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.set_yticks([0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8])
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("× base (median of rounds;\nwhisker: range of the rounds)")
    ax.set_title("eager decode, batch 1, H200: ratio to the base measured in the same round")
    ax.legend(fontsize=8)
    fig.savefig(HERE / "eager_b1_ratios.png", dpi=110)


def plot_noise() -> None:
    from matplotlib.figure import Figure

    data = json.loads((HERE / "call2_eager_b1" / "bench.json").read_text())
    host = [(float(r["t"]), float(r["probe_ms"])) for r in csv.DictReader((HERE / "call2_monitor/host.csv").open())]
    gpu = [(float(r["t"]), float(r["sm_mhz"])) for r in csv.DictReader((HERE / "call2_monitor/gpu.csv").open())]
    t0 = min(t for t, _ in host)
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    for i, method in enumerate(("base", "mixlora", "lora_switch_merge", "lora_switch_unmerged")):
        pts = [(t - t0, d) for r in data["rows"] if r["method"] == method
               for t, d in zip(r["repeat_started_at"], r["decode_ms_repeats"])]
        ax1.plot(*zip(*pts), "o", color=f"C{i}", label=method, ms=4)
    ax1.set_ylabel("decode ms/token\n(one repeat)")
    ax1.legend(fontsize=7, ncol=4)
    ax2.plot([t - t0 for t, _ in host], [p for _, p in host], lw=0.6)
    ax2.set_ylabel("host probe ms\n(fixed Python loop)")
    ax3.plot([t - t0 for t, _ in gpu], [m for _, m in gpu], lw=0.8, color="C3")
    ax3.set_ylabel("GPU SM MHz")
    ax3.set_xlabel("seconds into call 2")
    ax1.set_title("call 2: the same code swings 25–46 ms/token; the GPU clock stays at 1980 MHz, the host probe varies 2×")
    fig.savefig(HERE / "call2_host_noise.png", dpi=110)


def main() -> None:
    rows, env = load_rows()
    prof = json.loads((HERE / "call4_profile_static_b32" / "profile_summary.json").read_text())["rows"]
    lines = [f"Device: {env['device']} | torch {env['torch']} | transformers {env['transformers']} | triton "
             f"{env['triton']} | Llama-2-7B shape, random {env['model_dtype']} weights, "
             "prompt 64, 32 new tokens", "", *table(rows), "",
             "Profile, static cache + compiled, batch 32 (call 4, 8-warp tiles; torch.profiler, 17 new tokens):", ""]
    for p in prof:
        lines.append(f"- {p['method']}: wall {p['wall_ms_per_token']:.2f} ms/token, GPU busy "
                     f"{p['gpu_busy_ms_per_token']:.2f} ms/token (kernel time summed over streams), "
                     f"{p['gpu_kernels_per_token']:.0f} kernels/token")
    lines += ["", "Split-form kernel sweep at the production grid (call 5, `benchmark_decode_kernels.py --warps`):", "",
              *kernel_sweep()]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    (HERE / "results.json").write_text(json.dumps({"environment": env, "rows": rows, "profile": prof}, indent=1) + "\n")
    try:
        plot_eager(rows)
        plot_noise()
    except ImportError:
        print("matplotlib missing: no plots")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
