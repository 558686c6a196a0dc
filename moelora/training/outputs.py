"""What a run leaves in its directory besides checkpoints: results.json, curves.png, and for a
sweep, one summary table (CSV + markdown) of every job's final metrics."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS_NAME = "results.json"
METRICS_NAME = "metrics.csv"


def to_float(value: Any) -> float | None:
    """A logged metric (tensor or number) as a JSON-safe float; NaN/inf become None."""
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def library_versions() -> dict[str, str]:
    """Versions that decide the numbers of a run."""
    import pytorch_lightning
    import torch
    import transformers

    import moelora

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "moelora": moelora.__version__,
    }


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def set_aside_metrics_for_resume(run_dir: Path, resume_step: int) -> None:
    """Before a resume in the same directory: keep the old metrics.csv, which CSVLogger would
    delete, under a name that records the step the run resumes from."""
    current = run_dir / METRICS_NAME
    if current.is_file():
        current.rename(run_dir / f"metrics.before_resume_step{resume_step:08d}.csv")


def merge_resumed_metrics(run_dir: Path) -> None:
    """Prepend the rows logged before each resume to metrics.csv. Rows past the resume step were
    logged by the killed run after its last checkpoint; the resumed run logs them again."""
    parts = sorted(run_dir.glob("metrics.before_resume_step*.csv"))
    current = run_dir / METRICS_NAME
    if not parts or not current.is_file():
        return
    import pandas as pd  # only when there is something to merge: a run without a resume needs no pandas

    frames = []
    for p in parts:
        df, step = pd.read_csv(p), int(p.stem.rsplit("step", 1)[1])
        frames.append(df[df["step"] <= step] if "step" in df else df)
    frames.append(pd.read_csv(current))
    merged = pd.concat(frames, ignore_index=True, sort=False).drop_duplicates()
    if "step" in merged:
        merged = merged.sort_values("step", kind="stable")
    merged.to_csv(current, index=False)
    for p in parts:
        p.unlink()


def plot_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """Two panels from Lightning's metrics.csv: train/val loss, and per-task val accuracy."""
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(metrics_csv)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for col, style in (("train/loss", "-"), ("train/ce_loss", ":"), ("val/loss", "o-")):
        if col in df:
            s = df[["step", col]].dropna()
            ax_loss.plot(s["step"], s[col], style, label=col, markersize=4)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss (CE on answer tokens)")
    ax_loss.legend()
    acc_cols = sorted(c for c in df if c.startswith("val/acc/"))
    for col in acc_cols:
        s = df[["step", col]].dropna()
        ax_acc.plot(s["step"], s[col], "o-", label=col.removeprefix("val/acc/"), markersize=4)
    if "val/acc" in df:
        s = df[["step", "val/acc"]].dropna()
        ax_acc.plot(s["step"], s["val/acc"], "k--", label="mean", linewidth=2)
    ax_acc.set(xlabel="optimizer step", ylabel="exact match", title="validation accuracy per task", ylim=(-0.02, 1.02))
    if acc_cols:
        ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---- sweeps ------------------------------------------------------------------------------------
def _job_overrides(job_dir: Path) -> str:
    """The job's command-line overrides (Hydra's .hydra/overrides.yaml), as `k=v k=v`."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    return " ".join(str(i) for i in items)


def summarize_sweep(sweep_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """Collect every job's results.json under ``sweep_dir`` into summary.csv and summary.md; a job
    that failed (``"status": "failed"``) is a row with its error and no metrics."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    rows = []
    for res in sorted(sweep_dir.glob(f"*/{RESULTS_NAME}"), key=lambda p: (len(p.parent.name), p.parent.name)):
        r = json.loads(res.read_text())
        row: dict[str, Any] = {"job": res.parent.name, "overrides": _job_overrides(res.parent)}
        row["method"] = r.get("method")
        row["trainable_params"] = (r.get("trainable_params") or {}).get("trainable")
        metrics = r.get("metrics", {})
        for key in sorted(metrics):
            if key.startswith("test/") or key in ("val/loss", "val/acc"):
                row[key] = metrics[key]
        row["wall_time_s"] = r.get("wall_time_s")
        row["status"] = r.get("status", "finished")
        row["error"] = r.get("error")
        rows.append(row)
    if not rows:
        return None
    df = pd.DataFrame(rows)
    if df["error"].isna().all():
        df = df.drop(columns="error")  # no failed job: no empty column
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    df.to_csv(csv_path, index=False)
    md_path.write_text(f"# Sweep summary: {sweep_dir}\n\n{markdown_table(df)}\n")
    return csv_path, md_path


def markdown_table(df: Any, float_fmt: str = "{:.4g}") -> str:
    """A GitHub markdown table of a DataFrame (no `tabulate` dependency)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else float_fmt.format(v)
        return str(v).replace("|", "\\|")

    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def print_run_summary(run_dir: Path, results: Mapping[str, Any], file: Any = None) -> None:
    """The last lines of a run: per-task accuracy and where everything is."""
    file = file or sys.stdout
    metrics = results.get("metrics", {})
    accs = {k.removeprefix("test/acc/"): v for k, v in metrics.items() if k.startswith("test/acc/")}
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    if accs:
        p("Test accuracy (greedy exact match): " + "  ".join(f"{t} {v:.2f}" for t, v in accs.items())
          + f"  | mean {metrics.get('test/acc', float('nan')):.3f}")
    tp = results.get("trainable_params") or {}
    if tp:
        p(f"Trainable parameters: {tp['trainable']:,} of {tp['total']:,} ({tp['percent']:.2f}%)"
          f"  | wall time {results.get('wall_time_s', 0):.0f} s")
    p(f"Results are in {run_dir}/")
    for name, what in (
        (RESULTS_NAME, "final metrics, parameters, versions, seed"),
        (METRICS_NAME, "logged metrics per step"),
        ("curves.png", "loss and per-task accuracy"),
        ("adapter", "moelora.load_adapter(base_model, path)"),
        ("checkpoints/last.ckpt", "resume with: moelora-train ckpt_path=<this file>"),
        (".hydra/config.yaml", "the composed config"),
    ):
        if (run_dir / name).exists():
            p(f"  {name:<24} {what}")
