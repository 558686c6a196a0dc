"""Collect the multirun results of both arms into results.json, results.md and accuracy.png.

    python experiments/2026-11-23_lora_vs_mixlora/collect.py SWEEP_DIR [SWEEP_DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
TASKS = ["add", "classify", "mcq", "reverse", "sort"]


def main(sweeps: list[str]) -> None:
    runs = []
    for sweep in sweeps:
        for f in sorted(Path(sweep).glob("*/results.json")):
            d = json.loads(f.read_text())
            m = d["metrics"]
            runs.append({
                "method": d["method"], "seed": d["seed"], "trainable_params": d["trainable_params"]["trainable"]
                if isinstance(d.get("trainable_params"), dict) else d.get("trainable_params"),
                "test_acc": {t: m.get(f"test/acc/{t}") for t in TASKS} | {"mean": m.get("test/acc")},
                "test_loss": m.get("test/loss"), "wall_time_s": d.get("wall_time_s"), "run_dir": str(f.parent),
            })
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    summary = {}
    for method, rs in by.items():
        summary[method] = {
            "seeds": [r["seed"] for r in rs], "trainable_params": rs[0]["trainable_params"],
            "test_acc_mean": {k: statistics.mean(r["test_acc"][k] for r in rs) for k in TASKS + ["mean"]},
            "test_loss_mean": statistics.mean(r["test_loss"] for r in rs),
        }
    (HERE / "results.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    lines = ["| method | trainable params | seeds | " + " | ".join(TASKS) + " | mean acc | test loss |",
             "|---|---|---|" + "---|" * len(TASKS) + "---|---|"]
    for method, s in summary.items():
        accs = " | ".join(f"{s['test_acc_mean'][t]:.3f}" for t in TASKS)
        lines.append(f"| {method} | {s['trainable_params']:,} | {s['seeds']} | {accs} | "
                     f"{s['test_acc_mean']['mean']:.3f} | {s['test_loss_mean']:.3f} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(summary), 1)
    for i, (method, s) in enumerate(summary.items()):
        xs = [j + i * width for j in range(len(TASKS) + 1)]
        ax.bar(xs, [s["test_acc_mean"][t] for t in TASKS + ["mean"]], width, label=f"{method} ({s['trainable_params']:,} params)")
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(TASKS) + 1)], TASKS + ["mean"])
    ax.set_ylabel("test exact match (mean over seeds)")
    ax.set_title("SmolLM2-135M, synthetic suite, 150 steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "accuracy.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
