"""One table of accuracy and speed per model, read from the files the tools already write.

    moelora-leaderboard RUN_OR_SWEEP_DIRS... [--bench BENCH_DIRS...] [--baseline lora] [--out DIR]

- Accuracy: every ``results.json`` under the given directories (a ``moelora-train`` run, a sweep,
  a concurrent sweep). Runs that differ only in ``seed`` form one entry: per-task test exact
  match and the task mean, mean ± std over seeds; trainable parameters; training tokens/s and
  peak memory where the run recorded them. Failed and interrupted runs are listed, not scored.
- Paired comparison with ``--baseline`` (a method name): for each entry of the same model, the
  mean difference of the per-(seed, task) accuracies against the baseline's, matched by seed and
  task, and a two-sided paired t-test p-value (scipy) over those pairs.
- Speed: every ``bench.json`` under ``--bench`` (``moelora-bench`` / ``python -m moelora.bench``):
  per method, decode ms/token × base at batch 1 (eager: the paired ratio where measured; compiled:
  the static-cache rows), prefill × base, peak memory. The benchmark's model (often the
  Llama-2-7B shape with random weights) is named in the column header: speed does not depend on
  the weights, accuracy does, so the two are joined by method, never by model.

Writes ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.png`` (accuracy against decode
latency, one panel per model; trainable parameters on the x axis when no benchmark was given)
into ``--out`` (default: the current directory) and prints the markdown.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moelora.training.outputs import RESULTS_NAME, markdown_table

# The benchmark's method names -> the training method they time. LoRA-Switch decodes in merge
# mode at batch 1 (its fast path); the unmerged rows are used when no merge row exists.
BENCH_METHODS = {"lora": "lora", "mixlora": "mixlora", "lora_switch_merge": "lora_switch",
                 "lora_switch_unmerged": "lora_switch", "bdlora": "bdlora"}
COMPILED_MODES = ("static", "static_new", "compile")  # static_new: generate(cache_implementation="static") as users call it
# adapter-config fields that name a variant (the rest is the same for every run of a method here)
VARIANT_FIELDS = ("r", "num_experts", "top_k", "routing_strategy", "top_p", "nblocks")
NOT_A_VARIANT = ("seed",)  # overrides that only repeat a run


class LeaderboardError(ValueError):
    """Bad input: names what is wrong and how to fix it."""


# ---- reading ---------------------------------------------------------------------------------
def find_results(dirs: Iterable[str | Path]) -> list[Path]:
    """Every results.json at or under each of ``dirs`` (a run or a sweep directory)."""
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise LeaderboardError(f"{d}: no such directory; give moelora-train run or sweep directories")
        if d.is_file():
            if d.name != RESULTS_NAME:
                raise LeaderboardError(f"{d}: not a {RESULTS_NAME}; give a run or sweep directory")
            found.append(d)
            continue
        hits = sorted(d.rglob(RESULTS_NAME))
        if not hits:
            raise LeaderboardError(f"{d}: no {RESULTS_NAME} under it (is it a moelora-train run or sweep directory?)")
        found.extend(hits)
    return list(dict.fromkeys(p.resolve() for p in found))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LeaderboardError(f"{path}: cannot be read as JSON ({err}); rerun the job or remove the file") from err
    if not isinstance(data, dict):
        raise LeaderboardError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _variant(adapter: dict, overrides: Sequence[str]) -> tuple[str, str]:
    """(method label, group key) of a run: the method with the fields that name its variant, and
    every override except the seed (so runs of one config with several seeds group together)."""
    method = adapter.get("method") or "?"
    parts = []
    if "r" in adapter:
        parts.append(f"r{adapter['r']}")
    if method in ("mixlora", "lora_switch"):
        if adapter.get("routing_strategy") == "dynamic":
            parts.append(f"{adapter.get('num_experts')}e dyn p{adapter.get('top_p')}")
        else:
            parts.append(f"{adapter.get('num_experts')}e top-{adapter.get('top_k')}")
    if (adapter.get("nblocks") or 1) > 1:
        parts.append(f"{adapter['nblocks']} blocks")
    label = f"{method} ({', '.join(parts)})" if parts else method
    rest = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NOT_A_VARIANT)
    key = json.dumps({"adapter": {k: adapter.get(k) for k in VARIANT_FIELDS}, "method": method,
                      "overrides": rest}, sort_keys=True)
    return label, key


def _speed_key(adapter: dict) -> str | None:
    """The method whose benchmark rows give this run's speed columns, or None for a variant that
    no benchmark method times (dynamic routing, block-diagonal MixLoRA): their speed differs from
    the plain method's, so a join by method alone would print another configuration's numbers."""
    method = adapter.get("method")
    if adapter.get("routing_strategy") == "dynamic" or ((adapter.get("nblocks") or 1) > 1 and method != "bdlora"):
        return None
    return method


def load_runs(paths: Iterable[Path]) -> tuple[list[dict], list[dict]]:
    """(scored runs, skipped runs). A scored run: model, method, label, key, seed, trainable,
    per-task test accuracy and optional training throughput / memory."""
    runs, skipped = [], []
    for p in paths:
        r = _read_json(p)
        status = r.get("status", "finished")
        metrics = r.get("metrics") or {}
        accs = {k.removeprefix("test/acc/"): v for k, v in metrics.items()
                if k.startswith("test/acc/") and isinstance(v, (int, float))}
        if status != "finished" or not accs:
            skipped.append({"run": str(p.parent), "status": status,
                            "why": r.get("error") or ("no test accuracy" if not accs else status)})
            continue
        adapter = r.get("adapter") or {}
        label, key = _variant(adapter, r.get("overrides") or [])
        runs.append({
            "run": str(p.parent), "model": r.get("model") or "?", "method": adapter.get("method") or r.get("method"),
            "label": label, "key": key, "speed_key": _speed_key(adapter), "seed": r.get("seed"), "acc": accs,
            "mean_acc": metrics.get("test/acc", statistics.fmean(accs.values())),
            "trainable": (r.get("trainable_params") or {}).get("trainable"),
            "train_tokens_per_s": (r.get("throughput") or {}).get("train_tokens_per_s"),
            "peak_mem_mb": (r.get("throughput") or {}).get("peak_mem_mb"),
        })
    return runs, skipped


def load_bench_dirs(dirs: Iterable[str | Path]) -> list[dict]:
    """Every bench.json at or under ``dirs``: its model and its per-case rows (the summary over
    rounds where the run had several)."""
    from moelora.bench.output import JSON_NAME

    benches = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob(JSON_NAME)) if d.is_dir() else []
        if not files:
            raise LeaderboardError(f"{d}: no {JSON_NAME} at or under it; give moelora-bench output directories")
        for f in files:
            b = _read_json(f)
            if "rows" not in b:
                raise LeaderboardError(f"{f}: has no 'rows'; is it a moelora-bench bench.json?")
            benches.append({"file": str(f), "model": (b.get("settings") or {}).get("model", "?"),
                            "device": (b.get("environment") or {}).get("device", "?"),
                            "rows": b.get("summary") or b["rows"]})
    return benches


# ---- aggregating -----------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def bench_speed(benches: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per training method: decode × base at batch 1 (eager and compiled), prefill × base and peak
    memory, medians over every bench row that times it (and the bench model and device)."""
    acc: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for b in benches:
        # rows summarised over rounds carry prefill_ms but no prefill_ratio: the ratio is then taken
        # against the base row of the same mode, batch and prompt length
        base_prefill = {(r.get("mode"), r.get("batch_size"), r.get("prompt_len")): r.get("prefill_ms")
                        for r in b["rows"] if r.get("method") == "base" and not r.get("error")}
        for row in b["rows"]:
            method = BENCH_METHODS.get(row.get("method"))
            if method is None or row.get("error") or row.get("batch_size") != 1:
                continue
            if method == "lora_switch" and row["method"] == "lora_switch_unmerged" and any(
                    r.get("method") == "lora_switch_merge" and not r.get("error") for r in b["rows"]):
                continue
            slot = acc[method]
            if row.get("mode") == "eager":
                slot["decode_eager"].append(row.get("decode_ratio_paired") or row.get("decode_ratio"))
                prefill = row.get("prefill_ratio")
                base_ms = base_prefill.get((row.get("mode"), row.get("batch_size"), row.get("prompt_len")))
                if prefill is None and row.get("prefill_ms") and base_ms:
                    prefill = row["prefill_ms"] / base_ms
                slot["prefill"].append(prefill)
                slot["bench_peak_mem_mb"].append(row.get("peak_mem_mb"))
            elif row.get("mode") in COMPILED_MODES:
                slot["decode_compiled"].append(row.get("decode_ratio"))
            slot["bench"].append(f"{b['model']} on {b['device']}")
    return {m: {k: (sorted(set(v)) if k == "bench" else _median(v)) for k, v in d.items()} for m, d in acc.items()}


def _paired(entry_runs: list[dict], base_runs: list[dict]) -> tuple[float | None, float | None, int]:
    """Mean accuracy difference over (seed, task) pairs present in both, its paired t-test p, n."""
    base = {(r["seed"], t): v for r in base_runs for t, v in r["acc"].items()}
    diffs = [v - base[(r["seed"], t)] for r in entry_runs for t, v in r["acc"].items() if (r["seed"], t) in base]
    if len(diffs) < 2:
        return (diffs[0] if diffs else None), None, len(diffs)
    from scipy import stats

    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if any(d != diffs[0] for d in diffs) else None
    return statistics.fmean(diffs), p, len(diffs)


def build_tables(runs: list[dict], speed: dict[str, dict], baseline: str | None) -> dict[str, list[dict]]:
    """Per model, one row per entry (a config, its seeds pooled), best mean accuracy first."""
    by_model: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_model[r["model"]][r["key"]].append(r)
    tables = {}
    for model, groups in sorted(by_model.items()):
        base_group = None
        if baseline:
            cands = [g for g in groups.values() if g[0]["method"] == baseline]
            base_group = max(cands, key=len) if cands else None
        rows = []
        tasks = sorted({t for g in groups.values() for r in g for t in r["acc"]})
        for group in groups.values():
            first = group[0]
            row: dict[str, Any] = {"method": first["label"], "seeds": len(group), "trainable_params": first["trainable"]}
            for t in tasks:
                m, s = _mean_std([r["acc"].get(t) for r in group])
                row[f"acc/{t}"], row[f"acc/{t}_std"] = m, s
            row["acc/mean"], row["acc/mean_std"] = _mean_std([r["mean_acc"] for r in group])
            if base_group is not None and group is not base_group:
                d, p, n = _paired(group, base_group)
                row[f"vs_{baseline}"], row[f"vs_{baseline}_p"], row[f"vs_{baseline}_pairs"] = d, p, n
            row["train_tokens_per_s"] = _median(r["train_tokens_per_s"] for r in group)
            row["train_peak_mem_mb"] = _median(r["peak_mem_mb"] for r in group)
            sp = speed.get(first["speed_key"], {}) if first["speed_key"] else {}
            row["decode_x_base_eager"] = sp.get("decode_eager")
            row["decode_x_base_compiled"] = sp.get("decode_compiled")
            row["prefill_x_base"] = sp.get("prefill")
            row["bench_peak_mem_mb"] = sp.get("bench_peak_mem_mb")
            row["bench"] = "; ".join(sp.get("bench") or [])
            row["runs"] = " ".join(r["run"] for r in group)
            rows.append(row)
        rows.sort(key=lambda r: -r["acc/mean"] if math.isfinite(r["acc/mean"]) else math.inf)
        tables[model] = rows
    return tables


# ---- writing ---------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def to_markdown(tables: dict[str, list[dict]], skipped: list[dict], baseline: str | None) -> str:
    import pandas as pd

    out = ["# moelora leaderboard", ""]
    for model, rows in tables.items():
        tasks = [k.removeprefix("acc/") for k in rows[0] if k.startswith("acc/") and not k.endswith("_std")
                 and k != "acc/mean"]
        view = []
        for r in rows:
            v = {"method": r["method"], "seeds": r["seeds"], "trainable": r["trainable_params"]}
            for t in tasks:
                v[t] = f"{_fmt(r[f'acc/{t}'])} ± {_fmt(r[f'acc/{t}_std'])}"
            v["mean"] = f"**{_fmt(r['acc/mean'])}** ± {_fmt(r['acc/mean_std'])}"
            if baseline:
                d, p = r.get(f"vs_{baseline}"), r.get(f"vs_{baseline}_p")
                v[f"Δ vs {baseline} (p)"] = "" if d is None else f"{d:+.3f}" + ("" if p is None else f" ({p:.2g})")
            v["decode × base (eager, b1)"] = _fmt(r["decode_x_base_eager"], 2)
            v["decode × base (compiled, b1)"] = _fmt(r["decode_x_base_compiled"], 2)
            v["prefill × base"] = _fmt(r["prefill_x_base"], 2)
            v["train tok/s"] = _fmt(r["train_tokens_per_s"], 0)
            v["train peak MB"] = _fmt(r["train_peak_mem_mb"], 0)
            view.append(v)
        benches = sorted({r["bench"] for r in rows if r["bench"]})
        out += [f"## {model}", "", "Test exact match per task, mean ± std over seeds.", "",
                markdown_table(pd.DataFrame(view)), ""]
        if benches:
            out += [f"Speed columns: measured by moelora-bench on {'; '.join(benches)} (joined by method; "
                    "empty for variants no benchmark method times: dynamic routing, block-diagonal MixLoRA).", ""]
    if skipped:
        out += ["## Not scored", ""] + [f"- {s['run']}: {s['status']} ({s['why']})" for s in skipped] + [""]
    return "\n".join(out)


def write_csv(tables: dict[str, list[dict]], path: Path) -> None:
    import pandas as pd

    frames = [pd.DataFrame(rows).assign(model=model) for model, rows in tables.items()]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    cols = ["model"] + [c for c in df.columns if c != "model"]
    df[cols].to_csv(path, index=False)


def plot(tables: dict[str, list[dict]], path: Path) -> Path | None:
    """Mean accuracy (± std) against decode × base (eager, b1), or trainable parameters."""
    if not tables:
        return None
    # A bare Figure (no pyplot): draws off screen without switching the backend of a notebook
    # that called this first.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(tables), 4.2))
    axes = fig.subplots(1, len(tables), squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        speed = any(r["decode_x_base_eager"] is not None for r in rows)
        for r in rows:
            x = r["decode_x_base_eager"] if speed else r["trainable_params"]
            if x is None:
                continue
            ax.errorbar(x, r["acc/mean"], yerr=r["acc/mean_std"], fmt="o", capsize=3, label=r["method"])
        ax.set(xlabel="decode ms/token × base (eager, batch 1)" if speed else "trainable parameters",
               ylabel="test exact match (mean over tasks)", title=model)
        if not speed:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def leaderboard(run_dirs: Sequence[str | Path], bench_dirs: Sequence[str | Path] = (), out: str | Path = ".",
                baseline: str | None = "lora") -> dict[str, Any]:
    """Build and write the leaderboard; returns {"tables", "skipped", "files"}."""
    if not run_dirs:
        raise LeaderboardError("give at least one moelora-train run or sweep directory")
    runs, skipped = load_runs(find_results(run_dirs))
    if not runs:
        raise LeaderboardError("no finished run with test accuracy under "
                               + ", ".join(map(str, run_dirs)) + (f" ({len(skipped)} not scored)" if skipped else ""))
    speed = bench_speed(load_bench_dirs(bench_dirs)) if bench_dirs else {}
    if baseline and not any(r["method"] == baseline for r in runs):
        baseline = None  # nothing to pair with: no paired column rather than an empty one
    tables = build_tables(runs, speed, baseline)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(tables, skipped, baseline)
    (out / "leaderboard.md").write_text(md + "\n")
    write_csv(tables, out / "leaderboard.csv")
    png = plot(tables, out / "leaderboard.png")
    files = [str(out / "leaderboard.md"), str(out / "leaderboard.csv")] + ([str(png)] if png else [])
    return {"tables": tables, "skipped": skipped, "files": files, "markdown": md}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="moelora-leaderboard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="moelora-train run or sweep directories (searched for results.json)")
    p.add_argument("--bench", nargs="*", default=[], help="moelora-bench output directories (bench.json)")
    p.add_argument("--baseline", default="lora", help="method the paired comparison is against ('' for none)")
    p.add_argument("--out", default=".", help="where leaderboard.{md,csv,png} go")
    a = p.parse_args(argv)
    try:
        res = leaderboard(a.runs, a.bench, a.out, a.baseline or None)
    except LeaderboardError as err:
        print(f"moelora-leaderboard: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(res["markdown"])
    print("files: " + ", ".join(res["files"]))


if __name__ == "__main__":
    main()
