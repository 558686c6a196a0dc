"""What a benchmark run writes: bench.json, bench.csv, plots, and the printed table.

Standard library only for the tables (csv, json): the GPU machine may lack pandas; matplotlib is
optional (no plots without it, with a note in the log). Every file is written atomically
(``moelora.bench.jsonio``): a killed run leaves the previous complete file, never half of one.
"""
from __future__ import annotations

import csv
import logging
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moelora.bench.jsonio import atomic_open, read_json, write_json
from moelora.bench.versions import record_versions

log = logging.getLogger("moelora.bench")

JSON_NAME, CSV_NAME, SUMMARY_CSV_NAME = "bench.json", "bench.csv", "bench_summary.csv"
COLUMNS = ("method", "mode", "batch_size", "prompt_len", "new_tokens", "round", "prefill_ms", "decode_ms_per_token",
           "decode_ms_best", "step_ms_p50", "step_ms_p90", "decode_tokens_per_s", "total_ms", "peak_mem_mb",
           "prefill_ratio", "decode_ratio", "decode_ratio_best", "paired_base_ms_per_token", "decode_ratio_paired",
           "step_p50_ratio", "decode_ratio_vs_base_eager", "reference_speedup", "reference_speedup_best",
           "reference_speedup_paired",
           "hf_generate_ms_per_token", "harness_ratio", "selection_change_rate", "decode_graphs",
           "nonpositive_repeats", "error")
REFERENCE = "reference_mixlora"  # reference_speedup: its eager decode time over the row's
# what summarize_rounds reports per case: the median over rounds, and for the ratios also min/max
MEDIAN_KEYS = ("prefill_ms", "decode_ms_per_token", "step_ms_p50", "step_ms_p90", "decode_tokens_per_s",
               "peak_mem_mb", "paired_base_ms_per_token", "hf_generate_ms_per_token", "harness_ratio",
               "selection_change_rate", "decode_graphs")
SPREAD_KEYS = ("decode_ratio", "decode_ratio_paired", "decode_ratio_vs_base_eager", "reference_speedup",
               "reference_speedup_paired")
BEST_KEYS = ("decode_ms_best", "decode_ratio_best", "reference_speedup_best")  # over all rounds' repeats
SUMMARY_COLUMNS = (("method", "mode", "batch_size", "prompt_len", "new_tokens", "rounds") + MEDIAN_KEYS
                   + tuple(f"{k}{suffix}" for k in SPREAD_KEYS for suffix in ("", "_min", "_max")) + BEST_KEYS
                   + ("nonpositive_repeats", "error"))


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def environment(model, device: torch.device, command: str | None) -> dict[str, Any]:
    """``versions.record_versions`` (library versions, GPU, git commit, exact command) plus the
    device and the model's size: recorded with every number."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "device": device_name(device),
        "device_type": device.type,
        **record_versions(command),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "model_weight_gb": round(weight_bytes / 1e9, 3),
        "model_config": {k: getattr(model.config, k, None) for k in (
            "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")},
        "peak_mem_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
    }


def add_ratios(rows: list[dict]) -> None:
    """Ratios of every row to ``base`` of the same round/mode/B/P (and to base eager), and the
    speed-up over the reference MixLoRA (eager, same round/B/P; ``_paired``: from the paired
    ratios, each against the base timed beside it), in place."""
    def case(r: dict, mode: str) -> tuple:
        return r.get("round", 0), mode, r["batch_size"], r["prompt_len"]

    ok = [r for r in rows if not r.get("error")]
    base = {case(r, r["mode"]): r for r in ok if r["method"] == "base"}
    ref = {case(r, r["mode"]): r for r in ok if r["method"] == REFERENCE}
    pairs = (("prefill_ratio", "prefill_ms"), ("decode_ratio", "decode_ms_per_token"), ("step_p50_ratio", "step_ms_p50"),
             ("decode_ratio_best", "decode_ms_best"))
    for r in ok:
        b, be, re = base.get(case(r, r["mode"])), base.get(case(r, "eager")), ref.get(case(r, "eager"))
        for ratio, key in pairs:
            r[ratio] = _div(r.get(key), b.get(key) if b else None)
        d = r.get("decode_ms_per_token")
        r["decode_ratio_vs_base_eager"] = _div(d, be["decode_ms_per_token"] if be else None)
        r["reference_speedup"] = _div(re["decode_ms_per_token"] if re else None, d)
        r["reference_speedup_best"] = _div(re.get("decode_ms_best") if re else None, r.get("decode_ms_best"))
        own = 1.0 if r["method"] == "base" else r.get("decode_ratio_paired")  # the base is its own pair
        r["reference_speedup_paired"] = _div(re.get("decode_ratio_paired") if re else None, own)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize_rounds(rows: list[dict]) -> list[dict]:
    """One row per (method, mode, B, P) over the rounds of a run: the median of each measured
    value (``MEDIAN_KEYS``) and of each per-round ratio, with the ratios' min and max
    (``SPREAD_KEYS``); ``decode_ms_best`` is the smallest of the rounds' best-of estimates and the
    ``_best`` ratios compare those; ``nonpositive_repeats`` sums the rounds' noisy repeats.
    ``rounds`` counts the rounds that measured the case; a case no round measured keeps the first
    error."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["mode"], r["batch_size"], r["prompt_len"]), []).append(r)
    out = []
    for (method, mode, B, P), rs in groups.items():
        good = [r for r in rs if not r.get("error")]
        row: dict[str, Any] = {"method": method, "mode": mode, "batch_size": B, "prompt_len": P,
                               "new_tokens": rs[0]["new_tokens"], "rounds": len(good)}
        if not good:
            row["error"] = rs[0].get("error")
        for key in MEDIAN_KEYS + SPREAD_KEYS:
            vals = [r[key] for r in good if r.get(key) is not None]
            if vals:
                row[key] = statistics.median(vals)
                if key in SPREAD_KEYS:
                    row[f"{key}_min"], row[f"{key}_max"] = min(vals), max(vals)
        bests = [r["decode_ms_best"] for r in good if r.get("decode_ms_best") is not None]
        if bests:
            row["decode_ms_best"] = min(bests)
        noisy = sum(r.get("nonpositive_repeats", 0) for r in good)
        if noisy:
            row["nonpositive_repeats"] = noisy
        out.append(row)
    by = {(r["method"], r["mode"], r["batch_size"], r["prompt_len"]): r for r in out if r["rounds"]}
    for r in out:  # best-of ratios: bests over all rounds against the base's and the reference's bests
        b = by.get(("base", r["mode"], r["batch_size"], r["prompt_len"]))
        re = by.get((REFERENCE, "eager", r["batch_size"], r["prompt_len"]))
        r["decode_ratio_best"] = _div(r.get("decode_ms_best"), b.get("decode_ms_best") if b else None)
        r["reference_speedup_best"] = _div(re.get("decode_ms_best") if re else None, r.get("decode_ms_best"))
    return out


def write_tables(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """bench.json (settings, environment, rows[, summary]), bench.csv (one row per case and round)
    and, with a summary, bench_summary.csv (one row per case), each written atomically."""
    j, c = out_dir / JSON_NAME, out_dir / CSV_NAME
    write_json(j, result)
    write_csv(c, result["rows"], COLUMNS)
    if result.get("summary"):
        write_csv(out_dir / SUMMARY_CSV_NAME, result["summary"], SUMMARY_COLUMNS)
    return j, c


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """``rows`` as CSV, atomically; ``columns``: the header (default: every key, first seen first);
    keys a row lacks are empty cells, keys not in ``columns`` are left out."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in columns})
    return Path(path)


def _series(rows: Sequence[dict], key: str) -> dict[tuple[str, str, int], list[tuple[int, float]]]:
    """{(mode, method, prompt_len): [(batch size, value)]} of the rows that have ``key``."""
    out: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if r.get(key) is not None and not r.get("error"):
            out.setdefault((r["mode"], r["method"], r["prompt_len"]), []).append((r["batch_size"], r[key]))
    return {k: sorted(v) for k, v in out.items()}


def plot_vs_batch(rows: Sequence[dict], key: str, ylabel: str, title: str, log_y: bool = False):
    """A matplotlib Figure: ``key`` against batch size, one panel per mode, one line per method
    (and prompt length). Figure objects need no pyplot backend, so this works headless."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    series = _series(rows, key)
    modes = sorted({m for m, _, _ in series}) or ["eager"]
    fig = Figure(figsize=(5.5 * len(modes), 4.2), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    multi_p = len({p for _, _, p in series}) > 1
    for ax, mode in zip(axes, modes):
        for (m, method, p), pts in sorted(series.items()):
            if m != mode:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{method} (P={p})" if multi_p else method)
        ax.set_xscale("log", base=2)
        sizes = sorted({b for (m, _, _), pts in series.items() if m == mode for b, _ in pts})
        ax.set_xticks(sizes, [str(b) for b in sizes])  # plain batch sizes, not 2^k
        if log_y:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} — {mode}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def write_plots(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """latency_vs_batch.png and ratio_to_base.png (none if matplotlib is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (bench.json / bench.csv hold the numbers)")
        return []
    written = []
    for name, key, ylabel, title, log_y in (
        ("latency_vs_batch.png", "decode_ms_per_token", "decode ms per step", "decode latency", True),
        ("ratio_to_base.png", "decode_ratio", "× base (same mode)", "decode time / base", False),
    ):
        fig = plot_vs_batch(rows, key, ylabel, title, log_y)
        path = out_dir / name
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _spread(r: dict, key: str) -> str:
    """``median`` or, over several rounds, ``median [min-max]``."""
    v = _fmt(r.get(key))
    if r.get("rounds", 1) > 1 and r.get(f"{key}_min") is not None:
        v += f" [{r[f'{key}_min']:.2f}-{r[f'{key}_max']:.2f}]"
    return v


def _note(r: dict) -> str:
    if r.get("error"):
        return r["error"][:80]
    n = r.get("nonpositive_repeats")
    return f"noisy: {n} repeat(s) with decode <= 0" if n else ""


def format_table(result: dict) -> str:
    """The final summary: a markdown table of every case (over several rounds: the per-case
    medians, ratios with their range) plus where the files are."""
    env = result["environment"]
    summary = result.get("summary")
    rows = summary or result["rows"]
    head = ["method", "mode", "B", "P", "prefill ms", "decode ms/tok", "best", "tok/s", "peak MB", "× base",
            "paired", "(best)", "× base eager", "× faster than ref", "paired", "(best)", "harness / HF", "graphs",
            "error"]
    lines = [(f"# moelora latency: {env['device']} | torch {env['torch']} | transformers {env['transformers']}"
              f" | triton {env['triton']} | {env['model_dtype']}"),
             f"# command: {env['command']}"]
    if summary:
        lines.append(f"# medians over {max(r['rounds'] for r in summary)} rounds (ratios: [min-max] of the rounds);"
                     " best: the fastest repeat of any round")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["mode"], r["batch_size"], r["prompt_len"], _fmt(r.get("prefill_ms")),
                 _fmt(r.get("decode_ms_per_token")), _fmt(r.get("decode_ms_best")),
                 _fmt(r.get("decode_tokens_per_s"), 1), _fmt(r.get("peak_mem_mb"), 0), _spread(r, "decode_ratio"),
                 _spread(r, "decode_ratio_paired"), _fmt(r.get("decode_ratio_best")),
                 _spread(r, "decode_ratio_vs_base_eager"), _spread(r, "reference_speedup"),
                 _spread(r, "reference_speedup_paired"), _fmt(r.get("reference_speedup_best")),
                 _fmt(r.get("harness_ratio"), 3), r.get("decode_graphs", ""), _note(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out = result.get("settings", {}).get("out_dir")
    if out:
        names = [JSON_NAME, CSV_NAME] + ([SUMMARY_CSV_NAME] if summary else [])
        lines += ["", "files: " + ", ".join(f"{out}/{n}" for n in names) + (", plots" if result.get("plots") else "")]
    return "\n".join(lines)


def load_bench(path: str | Path) -> dict:
    """bench.json of a run directory (or the file itself)."""
    path = Path(path)
    return read_json(path / JSON_NAME if path.is_dir() else path)
