"""One full-model training step per method, in one process (issue 19, its training rows).

A step is forward + backward + gradient clipping + ``torch.optim.AdamW`` step over the adapter
parameters of a frozen base, on one batch of ``--batch`` x ``--seq`` random token ids (labels =
the ids: every token is trained on). Methods (``--methods``, comma list):

- ``peft_lora``: PEFT LoRA (``peft.get_peft_model``) rank ``--r`` on all seven linears
  (q, k, v, o, gate, up, down); the baseline of the ratios. Without peft installed its row holds
  the error and the others go on;
- ``lora``: moelora LoRA, the same rank on the same seven linears;
- ``mixlora``: moelora MixLoRA, ``--experts`` experts top-``--top-k`` rank ``--r`` on the FFN
  (sharing the frozen FFN) plus LoRA rank ``--r`` on attention (MixLoRA's default targets), expert
  backend ``auto`` (fused on CUDA); its training forward recomputes the expert deltas in backward
  (``moelora.layers.mix_recompute``);
- ``mixlora_plain`` (optional): the same MixLoRA with that recompute switched off
  (inside ``moelora.layers.dispatch.plain_mixture_backward()``, the switch that
  experiments/2026-12-02_mixlora_training_memory/measure_saved.py uses): its eager twin;
- ``mixlora_compiled`` (optional): MixLoRA with its expert hidden compiled (inside
  ``moelora.layers.dispatch.compiled_expert_hidden()``; ``moelora.layers.mixture_hidden``); the
  warm-up steps include the compilation;
- ``moe_peft_mixlora`` (optional): MoE-PEFT's MixLoRA (``moe-peft`` 2.0.2, installed with
  ``--no-deps``), the same experts, rank and targets over the same base
  (``moelora.bench.moe_peft_baseline``: how it is driven and the two shims it needs);
- ``mlora_mixlora`` (optional): the same through mLoRA 0.5.2 (``mlora``, MoE-PEFT's predecessor
  with the same API), installed with ``--no-deps``.

Precision, as the project trains (conf/trainer/gpu.yaml ``precision: bf16-mixed``): on CUDA the
frozen base is bf16 and the forward (with the loss) runs under ``torch.autocast(cuda, bfloat16)``,
backward and the optimizer outside it; the adapter parameters are fp32 master weights
(``adapter_dtype="float32"`` for moelora; PEFT's ``get_peft_model`` upcasts its adapter to fp32
itself, ``autocast_adapter_dtype=True``), and the PEFT model runs under the same autocast. On the
CPU everything is fp32, no autocast. The optimizer is the project's AdamW (conf/module/default.yaml:
lr 3e-3, betas 0.9/0.999, weight decay 0) after ``clip_grad_norm_(1.0)`` (conf/trainer/default.yaml
``gradient_clip_val``); dropout ``--dropout`` (0.05, the adapters' default). Adapter weights are
random (B too: a B of zeros would be a different computation for the router), the base's random
N(0, 0.02) of ``moelora.bench.models.build_shape_model``.

Per method and round: a fresh base (the previous one freed: del, gc, ``torch.cuda.empty_cache``),
the peak-memory counter reset, ``--warmup`` untimed steps, then ``--steps`` steps each timed
alone (``moelora.bench.timing.time_call_ms``: CUDA events, synchronised around every step).
Reported: median step ms, tokens/s (batch x seq / step time), peak memory
(``torch.cuda.max_memory_allocated`` since the reset: the weights, the optimizer state and the
step's activations; None on the CPU; ``held_before_gb``: what was allocated when the method
started, the previous methods' leftovers if > 0; ``model_freed``: whether its model was gone when it
ended, else its referrers are printed), trainable parameters, and ``tok_s_x_peft`` /
``peak_x_peft``: the ratio to ``peft_lora`` of the same round (paired). ``--rounds`` repeats the
method loop in alternating order; the table and ``training_step.csv`` hold the medians over rounds,
``training_step.json`` also every round's row. An error (OOM, ...) of one method is its row's
``error``; methods not started within ``--time-budget-s`` are recorded as skipped. ``--profile``: after the
timing, one more step under torch.profiler per method and round (wall vs device-busy ms and aten ops
in the row's ``profile``; the op table in ``profile_<method>.txt``).

    python -m moelora.bench.training_step --model llama2_7b_shape --methods peft_lora,lora,mixlora \\
        --batch 4 --seq 1024 --steps 5 --warmup 2 --rounds 2 --out results/training_step      # H200
    python -m moelora.bench.training_step --model tiny_shape --batch 2 --seq 32 --steps 1 --warmup 1 \\
        --rounds 1 --out /tmp/training_step                                                    # CPU smoke
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch

import moelora
from moelora.bench import moe_peft_baseline
from moelora.bench.jsonio import write_json
from moelora.bench.models import (MODEL_SHAPES, build_shape_model, randomize_adapter_, randomize_peft_lora_,
                                  resolve_device, resolve_dtype)
from moelora.bench.multi_adapter import LINEARS
from moelora.bench.output import device_name, write_csv
from moelora.bench.profiling import profile_call
from moelora.bench.timing import time_call_ms
from moelora.bench.versions import package_version, record_versions

METHODS = ("peft_lora", "lora", "mixlora", "mixlora_plain", "mixlora_compiled", *moe_peft_baseline.METHODS)
BASELINE = "peft_lora"
LR, BETAS, WEIGHT_DECAY, CLIP = 3.0e-3, (0.9, 0.999), 0.0, 1.0  # conf/module/default.yaml, conf/trainer
COLUMNS = ("method", "rounds", "batch", "seq", "tokens", "step_ms", "step_ms_min", "step_ms_max", "tok_s",
           "peak_mem_gb", "tok_s_x_peft", "peak_x_peft", "trainable", "loss", "error")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_method(method: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """A fresh frozen base of ``a.model`` with ``method``'s adapter (random weights), in train mode."""
    layers = {"num_hidden_layers": a.layers} if a.layers else {}
    model, _ = build_shape_model(a.model, str(dtype).removeprefix("torch."), device.type, a.seed, **layers)
    model.requires_grad_(False)
    if method == "peft_lora":
        import peft  # lazily: an optional dependency; ImportError becomes the row's error

        cfg = peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.dropout, target_modules=list(LINEARS))
        model = peft.get_peft_model(model, cfg)  # autocast_adapter_dtype=True: fp32 adapter over bf16
        randomize_peft_lora_(model, a.seed + 1)
    elif method in moe_peft_baseline.METHODS:
        return moe_peft_baseline.build(model, a.r, a.dropout, a.experts, a.top_k, LINEARS, device, a.seed,
                                       package=moe_peft_baseline.METHODS[method])
    else:
        common = dict(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.dropout, adapter_dtype="float32")
        if method == "lora":
            cfg = moelora.LoraConfig(target_modules=LINEARS, **common)
        elif method in ("mixlora", "mixlora_plain", "mixlora_compiled"):
            cfg = moelora.MixLoraConfig(num_experts=a.experts, top_k=a.top_k, **common)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        moelora.inject_adapter(model, cfg)
        randomize_adapter_(model, a.seed)
    return model.train()


def make_step(model, ids: torch.Tensor, device: torch.device, autocast: bool):
    """``(step, params)``: one training step of ``model`` on ``ids`` (labels = ids) as a closure,
    and the parameters it trains; ``step()`` returns the loss tensor (not synchronised)."""
    theirs = moe_peft_baseline.owns(model)  # MoE-PEFT's LLMModel: its own forward and adapter tensors
    params = moe_peft_baseline.params(model) if theirs else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)

    # MoE-PEFT does its own mixed precision (a bf16 base, its LoRA in fp32 by explicit casts) and its
    # trainer never enters autocast; under autocast its fused LoRA backward mixes fp32 and bf16 and
    # fails (index_copy_ of a bf16 gradient into an fp32 one), so it runs as its trainer runs it.
    autocast = autocast and not theirs

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if theirs:
                loss = moe_peft_baseline.loss(model, ids)
            else:
                loss = model(input_ids=ids, labels=ids).loss  # moelora: CE + router load-balance loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, params


def measure(method: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build ``method`` on a fresh base, warm up, time ``a.steps`` steps; the row's numbers."""
    from moelora.layers.dispatch import compiled_expert_hidden, plain_mixture_backward

    before = torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else None
    with plain_mixture_backward(method == "mixlora_plain"), compiled_expert_hidden(method == "mixlora_compiled"):
        model = build_method(method, a, device, dtype)
        alive = weakref.ref(model)
        g = torch.Generator(device="cpu").manual_seed(a.seed)
        vocab = model.config.vocab_size if hasattr(model, "config") else model.config_.vocab_size_  # MoE-PEFT's
        ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g).to(device)
        step, params = make_step(model, ids, device, autocast=device.type == "cuda" and dtype != torch.float32)
        trainable = sum(p.numel() for p in params)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.warmup):
            step()
        losses: list[torch.Tensor] = []
        times = [time_call_ms(lambda: losses.append(step()), device) for _ in range(a.steps)]
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        loss = float(losses[-1])
        prof = None
        if a.profile:  # after the timing and the peak: the profiler's overhead is in neither
            prof = profile_call(step, device, Path(a.out) / f"profile_{method}.txt")
        del model, step, params, losses
    ms = statistics.median(times)
    return {"step_ms": ms, "step_ms_min": min(times), "step_ms_max": max(times), "step_ms_all": times,
            "tok_s": a.batch * a.seq / (ms / 1e3), "peak_mem_gb": peak, "trainable": trainable, "loss": loss,
            # memory other objects held when the method started (part of its peak: a leak if > 0
            # after the first method) and whether its own model was freed when it ended
            "held_before_gb": before, "model_freed": _freed(alive), **({"profile": prof} if prof else {})}


def _freed(ref: "weakref.ref") -> bool:
    """True when the model behind ``ref`` is gone once garbage is collected; else its referrers'
    types on stderr (a leak). The caller releases the CUDA cache afterwards (``_free``)."""
    gc.collect()
    obj = ref()
    if obj is None:
        return True
    kinds = sorted({type(r).__qualname__ for r in gc.get_referrers(obj)})
    print(f"[training_step] model still referenced after its method ended, by: {', '.join(kinds)}",
          file=sys.stderr, flush=True)
    return False


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def summarize(round_rows: list[dict], methods: list[str], a: argparse.Namespace) -> list[dict]:
    """One row per method: medians over its rounds (the ratios: of each round's paired ratio)."""
    rows = []
    for m in methods:
        mine = [r for r in round_rows if r["method"] == m]
        ok = [r for r in mine if "error" not in r]
        row: dict[str, Any] = {"method": m, "rounds": len(ok), "batch": a.batch, "seq": a.seq,
                               "tokens": a.batch * a.seq}
        if not ok:
            row["error"] = mine[0]["error"] if mine else "not run"
            rows.append(row)
            continue

        def med(key):
            vals = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        row.update(step_ms=med("step_ms"), step_ms_min=min(r["step_ms_min"] for r in ok),
                   step_ms_max=max(r["step_ms_max"] for r in ok), tok_s=med("tok_s"), peak_mem_gb=med("peak_mem_gb"),
                   tok_s_x_peft=med("tok_s_x_peft"), peak_x_peft=med("peak_x_peft"), trainable=ok[0]["trainable"],
                   loss=med("loss"))
        rows.append(row)
    return rows


def run(a: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(a.device)
    dtype = resolve_dtype("auto", device)  # bf16 on CUDA, fp32 on CPU
    env = record_versions()
    env.update(peft=package_version("peft"), device=device_name(device), device_type=device.type)
    precision = ("bf16 base, bf16 autocast, fp32 adapter + AdamW" if dtype != torch.float32 else "fp32")
    result: dict[str, Any] = {"settings": vars(a), "environment": env, "device": str(device),
                              "precision": precision, "rows": [], "round_rows": []}
    out = Path(a.out)
    t_start = time.monotonic()
    failed: dict[str, str] = {}
    for rnd in range(a.rounds):
        order = a.methods if rnd % 2 == 0 else list(reversed(a.methods))
        this_round: dict[str, dict] = {}
        for m in order:
            row: dict[str, Any] = {"method": m, "round": rnd, "batch": a.batch, "seq": a.seq}
            if m in failed:
                row["error"] = f"skipped after: {failed[m]}"
            elif a.time_budget_s is not None and time.monotonic() - t_start > a.time_budget_s:
                row["error"] = f"skipped: time budget of {a.time_budget_s:.0f} s used up"
            else:
                print(f"[training_step] round {rnd}: {m}", file=sys.stderr, flush=True)
                try:
                    row.update(measure(m, a, device, dtype))
                except Exception as err:  # noqa: BLE001 - OOM, peft missing...: recorded, the others go on
                    row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
                    failed[m] = row["error"]
                    del err  # its traceback holds the failed method's model
                _free(device)
            this_round[m] = row
            # each method's numbers as soon as it ends: a run killed at its time limit keeps them
            # (H200: a 50 s limit killed a 7B round in its third method and left nothing)
            print(f"[training_step] {_one_line(row)}", file=sys.stderr, flush=True)
            write_json(out / "training_step.json", {**result, "unfinished_round": list(this_round.values())})
        base = this_round.get(BASELINE)
        for row in this_round.values():
            if "error" not in row:
                ok_base = base is not None and "error" not in base
                row["tok_s_x_peft"] = _ratio(row["tok_s"], base["tok_s"]) if ok_base else None
                row["peak_x_peft"] = _ratio(row["peak_mem_gb"], base["peak_mem_gb"]) if ok_base else None
        result["round_rows"].extend(this_round[m] for m in a.methods)
        result["rows"] = summarize(result["round_rows"], a.methods, a)
        write_json(out / "training_step.json", result)  # after every round: a killed run keeps its rounds
        write_csv(out / "training_step.csv", result["rows"], COLUMNS)
    return result


def _one_line(row: dict) -> str:
    keys = ("method", "round", "step_ms", "tok_s", "peak_mem_gb", "held_before_gb", "model_freed", "trainable", "error")
    return " ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row[k]}"
                    for k in keys if row.get(k) is not None)


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    shape = {**MODEL_SHAPES[s["model"]], **({"num_hidden_layers": s["layers"]} if s["layers"] else {})}
    lines = [f"device: {env.get('device')}  torch {env.get('torch')}  transformers {env.get('transformers')}  "
             f"peft {env.get('peft')}  moelora {env.get('moelora')} ({env.get('git_commit')})",
             f"command: {env.get('command')}",
             f"model: {s['model']} (hidden {shape['hidden_size']}, ffn {shape['intermediate_size']}, "
             f"{shape['num_hidden_layers']} layers), batch {s['batch']} x seq {s['seq']}, r={s['r']}, "
             f"mixlora {s['experts']} experts top-{s['top_k']}, dropout {s['dropout']}, {result['precision']}; "
             f"median of {s['steps']} steps after {s['warmup']} warm-up, medians over {s['rounds']} round(s)",
             "| method | step ms (min–max) | tokens/s | × PEFT tokens/s | peak GB | × PEFT peak | trainable |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) | "
                     f"{r['tok_s']:.0f} | {_fmt(r['tok_s_x_peft'], '.2f')} | {_fmt(r['peak_mem_gb'], '.2f')} | "
                     f"{_fmt(r['peak_x_peft'], '.2f')} | {r['trainable']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m moelora.bench.training_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2_7b_shape", choices=sorted(MODEL_SHAPES),
                   help="a moelora.bench.models.MODEL_SHAPES name (random weights)")
    p.add_argument("--layers", type=int, default=None, help="num_hidden_layers override (quick runs)")
    p.add_argument("--methods", type=lambda v: [m for m in v.split(",") if m], default=["peft_lora", "lora", "mixlora"],
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=2, help="method loops, in alternating order")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", dest="time_budget_s", type=float, default=None,
                   help="methods not started within this many seconds are recorded as skipped")
    p.add_argument("--profile", action="store_true",
                   help="after timing, one step per method and round under torch.profiler: wall vs device-busy ms "
                        "and aten ops in the row, the op table in profile_<method>.txt")
    p.add_argument("--out", default="training_step_results")
    a = p.parse_args(argv)
    bad = [m for m in a.methods if m not in METHODS]
    if bad or not a.methods:
        p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if min(a.batch, a.seq, a.steps, a.rounds) < 1 or a.warmup < 0:
        p.error("--batch, --seq, --steps and --rounds must be >= 1, --warmup >= 0")
    res = run(a)
    print(table(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
