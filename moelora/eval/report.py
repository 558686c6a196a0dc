"""The report of one ``moelora-eval`` run: results.json and results.md in the run directory.

results.json holds every metric (``test/<metric>/<task>``, the keys moelora-train's sweep
summary collects), the composed config, the adapter and its trainable parameter count, and the
library versions. results.md is the task × metric table.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS_JSON, RESULTS_MD, LM_EVAL_JSON = "results.json", "results.md", "lm_eval_results.json"


def versions() -> dict[str, str | None]:
    """Versions that decide an evaluation's numbers."""
    import torch
    import transformers

    import moelora

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__, "moelora": moelora.__version__}
    for name in ("lm_eval", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def metric_table(metrics: Mapping[str, float]) -> tuple[list[str], list[str], dict[tuple[str, str], str]]:
    """``(tasks, metrics, cells)`` of ``{"<metric>/<task>": value}``; a metric's stderr joins its
    cell as "0.61 ± 0.05"."""
    cells: dict[tuple[str, str], str] = {}
    tasks: list[str] = []
    names: list[str] = []
    for key, value in metrics.items():
        metric, _, task = key.partition("/")
        if metric.endswith("_stderr") or metric == "n":
            continue
        tasks += [task] if task not in tasks else []
        names += [metric] if metric not in names else []
        err = metrics.get(f"{metric}_stderr/{task}")
        cells[(task, metric)] = f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else "")
    return tasks, names, cells


def markdown_report(title: str, metrics: Mapping[str, float], header: Mapping[str, Any]) -> str:
    """results.md: a few facts about the run, then the task × metric table."""
    tasks, names, cells = metric_table(metrics)
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        n = metrics.get(f"n/{t}")
        label = f"{t} (n={int(n)})" if n is not None else t
        lines.append(f"| {label} | " + " | ".join(cells.get((t, m), "") for m in names) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_eval_report(run_dir: str | Path, metrics: Mapping[str, float], info: Mapping[str, Any],
                      lm_eval_results: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write results.json, results.md (and lm_eval_results.json, lm-eval's own output without the
    per-sample logs) into ``run_dir``; return the results dict. ``info`` holds the run's facts:
    model, adapter, method, trainable_params, config, wall_time_s..."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    results = {
        "status": "finished",
        "run_dir": str(run),
        **info,
        "metrics": {f"test/{k}": v for k, v in sorted(metrics.items())},
        "versions": versions(),
    }
    _write_json(run / RESULTS_JSON, results)
    header = {k: info.get(k) for k in ("model", "adapter", "method") if info.get(k) is not None}
    tp = info.get("trainable_params") or {}
    if tp:
        header["trainable parameters"] = f"{tp['trainable']:,} of {tp['total']:,} ({tp['percent']:.3f}%)"
    header["versions"] = ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
    (run / RESULTS_MD).write_text(markdown_report("moelora-eval results", metrics, header))
    if lm_eval_results is not None:
        _write_json(run / LM_EVAL_JSON, {k: v for k, v in lm_eval_results.items() if k != "samples"})
    return results
