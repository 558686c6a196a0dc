"""Figures of routing and latency results, for the notebooks and the run directories.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so it works headless
(save it with ``fig.savefig``) and displays in Jupyter.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from moelora.bench.output import plot_vs_batch


def routing_heatmaps(report: Mapping[str, Any], value: str = "load"):
    """One heatmap per routed layer: tasks (rows) × experts (columns), colour = ``value``
    ("load": share of the task's selections, or "importance": mean router probability).
    Uniform routing is 1/E everywhere; a bright cell is an expert that a task prefers."""
    from matplotlib.figure import Figure

    layers, tasks, E = report["layers"], report["tasks"], report["num_experts"]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(3.2 * cols + 1, 0.45 * len(tasks) * rows + 1.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    vmax = max(max(report["per_task"][t][str(layer)][value]) for t in tasks for layer in layers)
    im = None
    for ax, layer in zip(axes, layers):
        grid = [report["per_task"][t][str(layer)][value] for t in tasks]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(tasks)), tasks if layer == layers[0] or cols == 1 else [""] * len(tasks))
        ax.set_xlabel("expert")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[: len(layers)]), shrink=0.8, label=value)
    fig.suptitle(f"{report['method']}: expert {value} per task (E={E}, top-{report['top_k']})")
    return fig


def load_per_layer(report: Mapping[str, Any]):
    """Left: load of each expert per layer over all tasks (uniform = 1/E, dashed). Right: mean
    routing entropy per layer against its maximum log E, and the task/expert specialisation."""
    from matplotlib.figure import Figure

    layers, E = report["layers"], report["num_experts"]
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_load, ax_ent = fig.subplots(1, 2)
    bottom = [0.0] * len(layers)
    for e in range(E):
        vals = [report["per_layer"][str(layer)]["load"][e] for layer in layers]
        ax_load.bar([str(x) for x in layers], vals, bottom=bottom, label=f"expert {e}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for k in range(1, E):
        ax_load.axhline(k / E, color="white", lw=0.6, ls="--")
    ax_load.set(xlabel="layer", ylabel="share of selections", title="expert load per layer (all tasks)")
    ax_load.legend(fontsize=7, ncol=2, loc="upper right")
    ent = [report["per_layer"][str(layer)]["entropy"] for layer in layers]
    spec = [report["specialisation"][str(layer)]["normalised"] for layer in layers]
    ax_ent.plot(layers, ent, marker="o", label="mean routing entropy (nats)")
    ax_ent.axhline(math.log(E), color="grey", ls="--", label="max entropy log E")
    ax_ent.plot(layers, spec, marker="s", label="I(task; expert) / H(expert)")
    ax_ent.set(xlabel="layer", title="entropy and specialisation", xticks=layers)
    ax_ent.legend(fontsize=8)
    ax_ent.grid(True, alpha=0.3)
    return fig


def latency_vs_batch(rows: Sequence[dict], ratio: bool = False):
    """Decode ms per step (or its ratio to base) against batch size, per mode and method."""
    if ratio:
        return plot_vs_batch(rows, "decode_ratio", "× base (same mode)", "decode time / base")
    return plot_vs_batch(rows, "decode_ms_per_token", "decode ms per step", "decode latency", log_y=True)
