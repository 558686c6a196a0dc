"""The study's numbers from the runs' own files (results.json, metrics.csv); standard library only
(the GPU machine may lack pandas/scipy/matplotlib; a plot is drawn only if matplotlib is there).

    python analyse.py choose-lr STAGE1_DIR --arms a_s,a_l,... [--out DIR]
        per method the LR of the best val/acc at budget S (ties: lower val/loss), printed as the
        Hydra dict run.sh passes to stage 2 (+lr_by_arm={arm: lr}); budget-L arms take their
        method's budget-S choice; arms without a finished stage-1 run get the grid's middle value.
        Writes lr_selection.{md,csv} into --out.
    python analyse.py report WORK_DIR [--out DIR]
        study.{md,csv}: per budget and method, test exact match (task mean and per task) mean +- std
        over seeds, 95% CI of the pooled per-task accuracy, and the paired comparison with LoRA of
        the same budget over (seed, task) pairs: mean difference, paired t-test p (two-sided) and an
        exact sign-flip permutation p; routing.{md,csv}: per routed arm and layer, the training-time
        router statistics (expert load CV, max load, entropy / log E) at the first and the last
        logged step, mean over seeds; convergence.csv: per run the train loss over the last and the
        previous fifth of the steps (flat = relative change < 5%).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

TASKS_ORDER = ("add", "reverse", "sort", "classify", "mcq")


# ---- reading ---------------------------------------------------------------------------------
def runs_under(root: Path) -> list[dict]:
    out = []
    for res in sorted(root.rglob("results.json")):
        r = json.loads(res.read_text())
        ov = r.get("overrides") or []
        arm = next((o.split("=", 1)[1] for o in ov if o.lstrip("+").startswith("arm=")), None)
        if arm is None:
            m = re.match(r"(.+?)_(lr|seed)", res.parent.name)
            arm = m.group(1) if m else res.parent.name
        lr = next((float(o.split("=", 1)[1]) for o in ov if o.startswith("module.optimizer.lr=")), None)
        if lr is None:
            d = next((o.split("=", 1)[1] for o in ov if o.lstrip("+").startswith("lr_by_arm=")), None)
            if d:
                lr = parse_lr_dict(d).get(arm)
        r.update(arm=arm, lr=lr, dir=res.parent)
        out.append(r)
    return out


def parse_lr_dict(text: str) -> dict[str, float]:
    text = text.strip().strip("{}")
    return {k.strip(): float(v) for k, v in (kv.split(":") for kv in text.split(",") if ":" in kv)}


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def fnum(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def method_of(arm: str) -> str:
    return arm.rsplit("_", 1)[0]


def budget_of(arm: str) -> str:
    return arm.rsplit("_", 1)[1] if "_" in arm else "?"


# ---- statistics (no scipy) ---------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c if abs(c) > 1e-300 else 1e-300
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-12:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (Numerical Recipes' continued fraction)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def paired_t(diffs: list[float]) -> float | None:
    """Two-sided p of a one-sample t-test of the differences against 0."""
    n = len(diffs)
    if n < 2:
        return None
    sd = statistics.stdev(diffs)
    if sd == 0:
        return None
    t = statistics.fmean(diffs) / (sd / math.sqrt(n))
    df = n - 1
    return betainc(df / 2, 0.5, df / (df + t * t))


def sign_flip_p(diffs: list[float], max_exact: int = 16, draws: int = 20000) -> float | None:
    """Two-sided permutation p of the mean difference under random sign flips (exact up to 2^16)."""
    n = len(diffs)
    if n < 2 or all(d == 0 for d in diffs):
        return None
    obs = abs(sum(diffs))
    if n <= max_exact:
        hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= obs - 1e-12
                   for signs in itertools.product((1, -1), repeat=n))
        return hits / 2 ** n
    import random

    rng = random.Random(0)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= obs - 1e-12 for _ in range(draws))
    return (hits + 1) / (draws + 1)


def wilson(p: float, n: int) -> float:
    """Half-width of the 95% Wilson interval of a proportion p over n trials."""
    if n <= 0:
        return math.nan
    z = 1.959964
    denom = 1 + z * z / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom


def mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# ---- writing ---------------------------------------------------------------------------------
def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], out: Path, stem: str, title: str, note: str = "", md_rows: list[dict] | None = None) -> str:
    """``stem``.csv of ``rows`` and ``stem``.md of ``md_rows`` (default: the same rows)."""
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{stem}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"## {title}", ""] + ([note, ""] if note else [])
    rows = rows if md_rows is None else md_rows
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if not rows:
        md = "\n".join(lines + ["(no data)"]) + "\n"
        (out / f"{stem}.md").write_text(md)
        return md
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    return md


# ---- choose-lr -------------------------------------------------------------------------------
def choose_lr(stage1: Path, arms: list[str], out: Path | None) -> str:
    runs = runs_under(stage1) if stage1.is_dir() else []
    rows, best = [], {}
    grid = sorted({r["lr"] for r in runs if r["lr"] is not None})
    for r in sorted(runs, key=lambda r: (r["arm"], r["lr"] or 0)):
        m = r.get("metrics") or {}
        rows.append({"arm": r["arm"], "lr": r["lr"], "status": r.get("status"), "val/acc": m.get("val/acc"),
                     "val/loss": m.get("val/loss"), "train/loss": m.get("train/loss"),
                     **{f"val/{t}": m.get(f"val/acc/{t}") for t in TASKS_ORDER}})
        if r.get("status") == "finished" and m.get("val/acc") is not None:
            key = (m["val/acc"], -(m.get("val/loss") or math.inf))
            if r["arm"] not in best or key > best[r["arm"]][0]:
                best[r["arm"]] = (key, r["lr"])
    default = grid[len(grid) // 2] if grid else None
    chosen = {}
    for arm in arms:
        s_arm = f"{method_of(arm)}_s"
        lr = best.get(arm, best.get(s_arm, (None, None)))[1]
        chosen[arm] = lr if lr is not None else default
    for row in rows:
        row["chosen"] = "yes" if chosen.get(row["arm"]) == row["lr"] else ""
    if out is not None:
        write_table(rows, out, "lr_selection", "Stage 1: learning rate per method, chosen on val/acc (seed 1, budget S)",
                    "val = n_val held-out training-split rows per task (never test); budget L reuses the method's choice.")
        (out / "lr_by_arm.json").write_text(json.dumps(chosen, indent=2) + "\n")
    items = [f"{a}:{chosen[a]}" for a in arms if chosen[a] is not None]
    return "{" + ",".join(items) + "}"


# ---- report ----------------------------------------------------------------------------------
def study_rows(runs: list[dict]) -> list[dict]:
    fin = [r for r in runs if r.get("status") == "finished" and any(k.startswith("test/acc/") for k in r.get("metrics", {}))]
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in fin:
        by_arm[r["arm"]].append(r)
    rows = []
    for arm in sorted(by_arm, key=lambda a: (budget_of(a), a != f"lora_{budget_of(a)}", a)):
        group = by_arm[arm]
        m0 = group[0]
        tasks = [t for t in TASKS_ORDER if f"test/acc/{t}" in m0["metrics"]]
        row = {"budget": budget_of(arm), "arm": arm, "method": m0.get("method"),
               "trainable": (m0.get("trainable_params") or {}).get("trainable"), "lr": m0.get("lr"),
               "seeds": len(group), "steps": m0.get("global_step")}
        mean, std = mean_std([r["metrics"].get("test/acc") for r in group])
        row["test_mean"], row["test_mean_std"] = mean, std
        n_test = _n_test(m0)
        for t in tasks:
            tm, ts = mean_std([r["metrics"].get(f"test/acc/{t}") for r in group])
            row[f"{t}"], row[f"{t}_std"] = tm, ts
            row[f"{t}_ci95"] = wilson(tm, n_test * len(group)) if n_test else None
        base = by_arm.get(f"lora_{budget_of(arm)}")
        if base and arm != f"lora_{budget_of(arm)}":
            ref = {(r.get("seed"), t): r["metrics"].get(f"test/acc/{t}") for r in base for t in tasks}
            diffs = [r["metrics"][f"test/acc/{t}"] - ref[(r.get("seed"), t)] for r in group for t in tasks
                     if ref.get((r.get("seed"), t)) is not None and r["metrics"].get(f"test/acc/{t}") is not None]
            seed_ref = {r.get("seed"): r["metrics"].get("test/acc") for r in base}
            seed_diffs = [r["metrics"]["test/acc"] - seed_ref[r.get("seed")] for r in group if r.get("seed") in seed_ref]
            row["vs_lora"] = statistics.fmean(diffs) if diffs else None
            row["vs_lora_pairs"] = len(diffs)
            row["vs_lora_t_p"] = paired_t(diffs)
            row["vs_lora_signflip_p"] = sign_flip_p(diffs)
            row["vs_lora_seed_means"] = " ".join(f"{d:+.3f}" for d in seed_diffs)
        rows.append(row)
    return rows


def _n_test(results: dict) -> int | None:
    cfg = Path(results["dir"]) / ".hydra" / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^\s+n_test:\s*(\d+)", cfg.read_text(), re.M)
        if m:
            return int(m.group(1))
    ov = [o for o in results.get("overrides") or [] if o.startswith("data.n_test=")]
    return int(ov[-1].split("=")[1]) if ov else None


def routing_rows(runs: list[dict]) -> list[dict]:
    acc: dict[tuple[str, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        rows = metrics_rows(Path(r["dir"]))
        logged = [row for row in rows if any(k.startswith("router/layer") and row[k] not in ("", None) for k in row)]
        if not logged:
            continue
        E = (r.get("adapter") or {}).get("num_experts") or 1
        for when, row in (("first", logged[0]), ("last", logged[-1])):
            layers = sorted({int(k.split("/")[1][5:]) for k in row if k.startswith("router/layer") and row[k] != ""})
            for layer in layers:
                pre = f"router/layer{layer:02d}"
                loads = [fnum(row.get(f"{pre}/load_e{e}")) for e in range(E)]
                loads = [x for x in loads if x is not None]
                slot = acc[(r["arm"], layer)]
                slot[f"{when}_load_cv"].append(fnum(row.get(f"{pre}/load_cv")))
                ent = fnum(row.get(f"{pre}/entropy"))
                slot[f"{when}_entropy_norm"].append(None if ent is None or E < 2 else ent / math.log(E))
                slot[f"{when}_max_load"].append(max(loads) if loads else None)
                # logged from 2026-12-03 on (moelora.router_statistics): absent in older runs
                slot[f"{when}_experts_per_token"].append(fnum(row.get(f"{pre}/experts_per_token")))
                slot["step_" + when].append(fnum(row.get("step")))
    out = []
    for (arm, layer), slot in sorted(acc.items()):
        row = {"arm": arm, "layer": layer, "runs": len(slot["first_load_cv"])}
        for k in ("first_load_cv", "last_load_cv", "first_max_load", "last_max_load", "first_entropy_norm",
                  "last_entropy_norm", "first_experts_per_token", "last_experts_per_token"):
            row[k] = mean_std([v for v in slot[k] if v is not None])[0]
        row["last_step"] = mean_std([v for v in slot["step_last"] if v is not None])[0]
        out.append(row)
    return out


def routing_summary(rows: list[dict]) -> list[dict]:
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    out = []
    for arm, layers in sorted(by_arm.items()):
        row = {"arm": arm, "layers": len(layers), "runs": max(r["runs"] for r in layers)}
        for k in ("first_load_cv", "last_load_cv", "first_entropy_norm", "last_entropy_norm", "last_experts_per_token"):
            row[k] = mean_std([r[k] for r in layers if not math.isnan(r[k])])[0]
        row["last_max_load_max"] = max((r["last_max_load"] for r in layers if not math.isnan(r["last_max_load"])), default=None)
        row["collapsed_layers"] = sum(1 for r in layers if r["last_max_load"] > 0.5)
        row["last_step"] = layers[0]["last_step"]
        out.append(row)
    return out


def convergence_rows(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        pts = [(fnum(row.get("step")), fnum(row.get("train/loss"))) for row in metrics_rows(Path(r["dir"]))]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if len(pts) < 5:
            continue
        n, k = len(pts), max(1, len(pts) // 5)
        last_v = [v for _, v in pts[-k:]]
        prev_v = [v for _, v in pts[-2 * k: -k]]
        last, prev = statistics.fmean(last_v), statistics.fmean(prev_v)
        rel = (prev - last) / prev if prev else None
        # the drop in units of its standard error (per-step losses are noisy: a 32-row batch's loss
        # varies by tens of percent), so a reader can tell a trend from noise; "flat" stays the
        # design's criterion (< 5% change)
        se = math.sqrt((statistics.variance(last_v) / len(last_v) if len(last_v) > 1 else 0.0)
                       + (statistics.variance(prev_v) / len(prev_v) if len(prev_v) > 1 else 0.0))
        out.append({"run": Path(r["dir"]).name, "arm": r["arm"], "seed": r.get("seed"), "lr": r.get("lr"),
                    "steps": r.get("global_step"), "first_loss": pts[0][1], "prev_fifth_loss": prev,
                    "last_fifth_loss": last, "rel_drop_last_fifth": rel,
                    "drop_z": (prev - last) / se if se > 0 else None,
                    "flat": None if rel is None else ("yes" if abs(rel) < 0.05 else "no")})
    return out


def plot_curves(runs: list[dict], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    arms = sorted({r["arm"] for r in runs})
    if not arms:
        return
    fig = Figure(figsize=(12, 3 * math.ceil(len(arms) / 4)))
    axes = fig.subplots(math.ceil(len(arms) / 4), 4, squeeze=False).ravel()
    for ax, arm in zip(axes, arms):
        for r in (r for r in runs if r["arm"] == arm):
            pts = [(fnum(x.get("step")), fnum(x.get("train/loss"))) for x in metrics_rows(Path(r["dir"]))]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]
            if pts:
                ax.plot(*zip(*pts), label=f"seed {r.get('seed')} lr {r.get('lr')}", linewidth=1)
        ax.set(title=arm, xlabel="step", ylabel="train loss")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(work: Path, out: Path) -> None:
    stage2 = runs_under(work / "stage2") if (work / "stage2").is_dir() else []
    stage1 = runs_under(work / "stage1") if (work / "stage1").is_dir() else []
    parts = ["# Accuracy study: analysis", "",
             f"{len(stage2)} stage-2 runs ({sum(r.get('status') == 'finished' for r in stage2)} finished), "
             f"{len(stage1)} stage-1 runs.", ""]
    rows = study_rows(stage2)
    parts.append(write_table(rows, out, "study", "Test exact match per method and budget (mean ± std over seeds)",
                             "`<task>_ci95`: 95% Wilson half-width of the pooled per-task accuracy (n_test x seeds rows); "
                             "`vs_lora`: mean over (seed, task) pairs of (method - LoRA of the same budget), paired "
                             "t-test and exact sign-flip p; `vs_lora_seed_means`: per-seed difference of the task means."))
    routing = routing_rows(stage2)
    parts.append(write_table(routing, out, "routing", "Router statistics (training, first / last logged step; mean over seeds)",
                             "Per arm over its routed layers (routing.csv: per layer): load_cv = std/mean of the experts' "
                             "token shares (0 = balanced); max_load = largest expert share (balanced: 1/E); entropy_norm = "
                             "mean per-token routing entropy / log E (1 = uniform router probabilities, 0 = one-hot); "
                             "collapsed_layers = layers whose largest share at the last step is > 0.5; experts_per_token = "
                             "mean number of experts a token runs through (top-k: k; dynamic: what top-p kept; nan in "
                             "runs from before it was logged).",
                             md_rows=routing_summary(routing)))
    conv = convergence_rows(stage2 + stage1)
    parts.append(write_table(conv, out, "convergence", "Train loss over the last and previous fifth of the logged steps"))
    (out / "study.md").write_text("\n".join(parts))
    plot_curves(stage2, out / "train_loss.png")
    print(parts[3] if len(parts) > 3 else "")  # the study table; the rest is in study.md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose-lr")
    c.add_argument("stage1", type=Path)
    c.add_argument("--arms", required=True)
    c.add_argument("--out", type=Path, default=None)
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.cmd == "choose-lr":
        print(choose_lr(a.stage1, [x for x in a.arms.split(",") if x], a.out))
    else:
        report(a.work, a.out or a.work / "analysis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
