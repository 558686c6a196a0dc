"""Router statistics of a trained adapter on an evaluation set: do experts specialise?

``routing_report(model, tokenizer, examples_by_task)`` runs teacher-forced forwards (prompt +
target, padding masked) task by task and accumulates, per task and routed layer, how often each
expert is selected (load), its mean router probability (importance) and the mean per-token
routing entropy. Per layer it also gives the mutual information I(task; expert) of the selected
experts, normalised by H(expert): 0 = every task uses the experts alike, 1 = the expert
identifies the task. It reads only ``moelora.routing_records`` and ``moelora.router_statistics``.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import moelora

REPORT_JSON, LOAD_CSV, LAYER_CSV = "routing.json", "routing_load.csv", "routing_layers.csv"


class _Acc:
    """Sums over the tokens of one (task, layer): selections per expert, probabilities, entropy."""

    def __init__(self, num_experts: int) -> None:
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.tokens = 0.0

    def add(self, experts, weights, mask, stats: dict) -> None:
        keep = (weights != 0) if mask is None else (weights != 0) & mask[:, None]  # (N, K)
        self.counts += torch.bincount(experts[keep].flatten().cpu(), minlength=len(self.counts)).double()
        n = float(stats["tokens"])
        self.prob_sum += stats["importance"].detach().double().cpu() * n
        self.entropy_sum += float(stats["entropy"]) * n
        self.tokens += n

    def summary(self) -> dict[str, Any]:
        load = self.counts / self.counts.sum().clamp_min(1.0)
        return {
            "tokens": int(self.tokens),
            "selections": self.counts.tolist(),
            "load": load.tolist(),
            "importance": (self.prob_sum / max(self.tokens, 1.0)).tolist(),
            "entropy": self.entropy_sum / max(self.tokens, 1.0),
            "load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)),
        }


def _batches(tokenizer, examples: Sequence[dict], batch_size: int, max_length: int, with_target: bool):
    from moelora.data import CausalLMCollator, encode_example, encode_prompt

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = CausalLMCollator(pad, padding_side="right")
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        if with_target:
            feats = [encode_example(tokenizer, ex, max_length) for ex in chunk]
        else:
            feats = [{"input_ids": encode_prompt(tokenizer, ex["prompt"], max_length)} for ex in chunk]
        yield collate(feats)


def _mutual_information(per_task_counts: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """I(task; expert) in nats over expert selections, and I / H(expert)."""
    joint = torch.stack(list(per_task_counts.values()))  # (tasks, E)
    total = joint.sum()
    if total <= 0:
        return 0.0, 0.0
    p = joint / total
    pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pt @ pe)[nz]).log()).sum())
    h = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
    return mi, (mi / h if h > 0 else 0.0)


@torch.no_grad()
def routing_report(model, tokenizer, examples_by_task: Mapping[str, Sequence[dict]], batch_size: int = 16,
                   max_length: int = 256, with_target: bool = True) -> dict[str, Any]:
    """Routing statistics per task and layer (see the module docstring). ``examples_by_task``
    maps a task name to unified examples (``prompt``, ``target``). Returns a JSON-able dict:
    ``{"method", "num_experts", "top_k", "tasks", "layers", "per_task": {task: {layer: stats}},
    "per_layer": {layer: stats over all tasks}, "specialisation": {layer: {...}}}``."""
    cfg = moelora.get_adapter_config(model)
    if cfg is None or not hasattr(cfg, "num_experts"):
        raise ValueError("routing_report needs a model with a routed adapter (MixLoRA or LoRA-Switch)")
    E = cfg.num_experts
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_task: dict[str, dict[int, _Acc]] = {}
    overall: dict[int, _Acc] = {}
    try:
        for task, examples in examples_by_task.items():
            accs = per_task.setdefault(task, {})
            for batch in _batches(tokenizer, list(examples), batch_size, max_length, with_target):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                stats = {s["layer"]: s for s in moelora.router_statistics(model)}
                for layer, (experts, weights, mask) in moelora.routing_records(model).items():
                    for target in (accs, overall):
                        target.setdefault(layer, _Acc(E)).add(experts, weights, mask, stats[layer])
    finally:
        model.train(was_training)
    layers = sorted(overall)
    spec = {}
    for layer in layers:
        mi, norm = _mutual_information({t: per_task[t][layer].counts for t in per_task if layer in per_task[t]})
        spec[str(layer)] = {"mutual_information": mi, "normalised": norm}
    return {
        "method": cfg.method,
        "num_experts": E,
        "top_k": cfg.top_k,
        "tasks": list(per_task),
        "layers": layers,
        "per_task": {t: {str(layer): a.summary() for layer, a in sorted(accs.items())} for t, accs in per_task.items()},
        "per_layer": {str(layer): overall[layer].summary() for layer in layers},
        "specialisation": spec,
    }


def load_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tidy rows ``(task, layer, expert, load, importance, selections)``: one per task, layer
    and expert, plus task ``"all"`` for the totals (the CSV and the notebooks' tables)."""
    rows = []
    sections = [(t, report["per_task"][t]) for t in report["tasks"]] + [("all", report["per_layer"])]
    for task, layers in sections:
        for layer, s in layers.items():
            for e in range(report["num_experts"]):
                rows.append({"task": task, "layer": int(layer), "expert": e, "load": s["load"][e],
                             "importance": s["importance"][e], "selections": s["selections"][e]})
    return rows


def layer_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (task or "all", layer): tokens, entropy, load CV, and the specialisation."""
    rows = []
    sections = [(t, report["per_task"][t]) for t in report["tasks"]] + [("all", report["per_layer"])]
    for task, layers in sections:
        for layer, s in layers.items():
            row = {"task": task, "layer": int(layer), "tokens": s["tokens"], "entropy": s["entropy"],
                   "max_entropy": math.log(report["num_experts"]), "load_cv": s["load_cv"]}
            if task == "all":
                row.update(report["specialisation"][layer])
            rows.append(row)
    return rows


def routing_frames(report: Mapping[str, Any]):
    """``(load_df, layer_df)``: ``load_rows`` and ``layer_rows`` as pandas DataFrames."""
    import pandas as pd

    return pd.DataFrame(load_rows(report)), pd.DataFrame(layer_rows(report))


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def write_routing_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """routing.json (the report), routing_load.csv and routing_layers.csv in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / REPORT_JSON, "load_csv": out / LOAD_CSV, "layers_csv": out / LAYER_CSV}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    _write_csv(paths["load_csv"], load_rows(report))
    layers = layer_rows(report)
    keys = list(dict.fromkeys(k for r in layers for k in r))  # "all" rows add the MI columns
    _write_csv(paths["layers_csv"], [{k: r.get(k) for k in keys} for r in layers])
    return paths


def load_routing_report(path: str | Path) -> dict[str, Any]:
    """routing.json of a run directory (or the file itself)."""
    path = Path(path)
    return json.loads((path / REPORT_JSON if path.is_dir() else path).read_text())
