"""What block-diagonal LoRA costs on one GPU (TP=1): per layer and per decoded token (issue 18).

Block-diagonal LoRA (``moelora.BdLoraConfig``, ``MixLoraConfig(nblocks=)``) removes the extra
collectives of a tensor-parallel LoRA; this measures that it adds no compute where there is no
communication to save, at equal trainable parameters (the rank from ``rank_for_budget``):

- **layer**: one Llama-2-7B linear (q-like 4096×4096 column, gate/up-like 4096→11008 column,
  down-like 11008→4096 row), forward and forward+backward, for ``tokens`` tokens:
  ``base`` (the frozen GEMM), ``lora`` (plain rank r: at TP=1 also what the S-LoRA-style and the
  replicated forms compute), ``bdlora`` (block-diagonal at the equal-budget rank, blockwise:
  ``BdLoraAdapter.blocked_delta``, what runs), ``bdlora_same_rank`` (rank r, fewer parameters),
  ``bdlora_dense`` (the dense reference math on ``torch.block_diag`` factors). The blockwise and
  dense results are compared before timing (``max_abs_diff``).
- **decode**: the whole 7B-shaped model (random weights; bf16 on CUDA), greedy ``generate``,
  batch 1: ms/token = (t(N+1 new) - t(1 new)) / N (``moelora.bench.latency.measure_case``), each
  repeat paired with a repeat of the plain base (``decode_ratio_paired``): ``base``, ``lora``,
  ``bdlora`` and ``mixlora`` / ``mixlora_bd`` (``MixLoraConfig(nblocks=N)``, equal budget).

    python -m moelora.bench.bdlora --out results/bdlora                      # H200: 7B shape
    python -m moelora.bench.bdlora --device cpu --model tiny --out /tmp/bd   # CPU smoke (seconds)

Writes ``bdlora.json`` (settings, environment: device, versions, command; every row),
``bdlora_layers.csv`` and ``bdlora_decode.csv`` into ``--out``, and prints both tables. Imports
torch, transformers and moelora only (no hydra / omegaconf / peft / lightning).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora
from moelora.bench import models as bench_models
from moelora.bench.jsonio import write_json
from moelora.bench.latency import measure_case
from moelora.bench.output import device_name, write_csv
from moelora.bench.settings import BenchSettings
from moelora.bench.timing import time_ms
from moelora.bench.versions import default_command, record_versions
from moelora.methods.bdlora.config import COLUMN_MODULES, ROW_MODULES
from moelora.methods.bdlora.layer import BdLoraAdapter
from moelora.methods.lora.layer import LoraAdapter

MODELS = {"7b": "llama2_7b_shape", "tiny": "tiny_shape"}
LAYER_VARIANTS = ("base", "lora", "bdlora", "bdlora_same_rank", "bdlora_dense")
DECODE_METHODS = ("base", "lora", "bdlora", "mixlora", "mixlora_bd")
LAYER_COLUMNS = ("layer", "role", "d_in", "d_out", "tokens", "nblocks", "variant", "r", "params", "fwd_ms",
                 "fwd_ratio", "fwd_bwd_ms", "fwd_bwd_ratio", "max_abs_diff")
DECODE_COLUMNS = ("method", "nblocks", "r", "trainable", "round", "decode_ms_per_token", "decode_ms_best",
                  "paired_base_ms_per_token", "decode_ratio_paired", "prefill_ms", "peak_mem_mb", "error")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moelora.bench.bdlora", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="7b", help="7b: Llama-2-7B shape; tiny: the CPU smoke shape")
    p.add_argument("--device", default="auto", help="auto = cuda if available")
    p.add_argument("--dtype", default="auto", help="auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--r", type=int, default=16, help="rank of the plain LoRA (the parameter budget)")
    p.add_argument("--nblocks", default="2,8", help="block counts (= the tensor-parallel sizes they are for)")
    p.add_argument("--tokens", default="1,4096", help="layer part: tokens per call (1: decode; 4096: 8×512 training)")
    p.add_argument("--layer-repeats", type=int, default=50, help="timed calls per layer case (median)")
    p.add_argument("--parts", default="layer,decode", help="layer, decode or both")
    p.add_argument("--methods", default=",".join(DECODE_METHODS), help="decode part: methods")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="decode part: paired repeats per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="decode part: method loops, reversed every other round")
    p.add_argument("--no-decode-graphs", dest="decode_graphs", action="store_false",
                   help="decode part: plain LoRA without its eager-decode CUDA graphs (the block-diagonal forms have none)")
    p.add_argument("--time-budget-s", type=float, default=None, help="decode cases not started by then are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bdlora.json and the CSVs")
    args = p.parse_args(argv)
    args.nblocks = [int(v) for v in args.nblocks.split(",") if v]
    args.tokens = [int(v) for v in args.tokens.split(",") if v]
    args.parts = [v for v in args.parts.split(",") if v]
    args.methods = [v for v in args.methods.split(",") if v]
    bad = [m for m in args.methods if m not in DECODE_METHODS] + [v for v in args.parts if v not in ("layer", "decode")]
    if bad:
        p.error(f"unknown method/part {bad}; methods: {DECODE_METHODS}, parts: layer, decode")
    if min(args.nblocks + args.tokens + [args.r, args.layer_repeats, args.repeats, args.new_tokens]) < 1:
        p.error("nblocks, tokens, r, repeats and new-tokens must be positive")
    return args


# ---- parameter budgets ----------------------------------------------------------------------
def linear_params(d_in: int, d_out: int, r: int, nblocks: int = 1, role: str = "column") -> int:
    """Trainable parameters of one (block-diagonal when nblocks > 1) LoRA linear (BdLoraConfig docstring)."""
    if nblocks == 1:
        return r * (d_in + d_out)
    return r * d_in + r * d_out // nblocks if role == "column" else r * d_in // nblocks + r * d_out


def _linears(shape: dict[str, int]) -> dict[str, tuple[int, int]]:
    """logical name -> (d_in, d_out) of one decoder layer."""
    d, f = shape["hidden_size"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def model_params(shape: dict[str, int], r: int, nblocks: int, experts: int = 0) -> int:
    """Adapter parameters per decoder layer: LoRA on all seven linears, or (``experts`` > 0) MixLoRA:
    LoRA on attention + ``experts`` LoRAs of gate/up/down + the router."""
    total = 0
    for name, (d_in, d_out) in _linears(shape).items():
        role = "column" if name in COLUMN_MODULES else "row"
        mult = experts if experts and name in ("gate_proj", "up_proj", "down_proj") else 1
        total += mult * linear_params(d_in, d_out, r, nblocks, role)
    return total + (experts * shape["hidden_size"] if experts else 0)


def budget_rank(shape: dict[str, int], r_plain: int, nblocks: int, experts: int = 0) -> int:
    """The largest rank (a multiple of nblocks) whose block-diagonal adapter has at most the
    parameters of the plain rank-``r_plain`` one (one rank for the whole model, as the config has)."""
    budget = model_params(shape, r_plain, 1, experts)
    r = nblocks
    while model_params(shape, r + nblocks, nblocks, experts) <= budget:
        r += nblocks
    return r


# ---- layer part ---------------------------------------------------------------------------------
def _layer_shapes(shape: dict[str, int]) -> list[tuple[str, str, int, int]]:
    lin = _linears(shape)
    return [("q_proj", "column", *lin["q_proj"]), ("gate_proj", "column", *lin["gate_proj"]),
            ("down_proj", "row", *lin["down_proj"])]


@torch.no_grad()
def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    for p in module.parameters():
        p.normal_(0.0, bench_models.WEIGHT_STD, generator=gen)


def _variants(base: nn.Linear, role: str, r: int, r_bd: int, n: int, gen) -> dict[str, tuple[int, Any]]:
    """variant -> (rank, adapter or None)."""
    def bd(rank):
        cfg = moelora.BdLoraConfig(r=rank, lora_alpha=2 * rank, nblocks=n, lora_dropout=0.0).validate()
        return BdLoraAdapter(base, cfg, role)

    out = {"base": (0, None), "lora": (r, LoraAdapter(base, r, 2 * r, 0.0)), "bdlora": (r_bd, bd(r_bd)),
           "bdlora_same_rank": (r, bd(r))}
    out["bdlora_dense"] = out["bdlora"]
    for _, a in out.values():
        if a is not None:
            _randomize(a, gen)
            a.eval()
    return out


def _forward(variant: str, base: nn.Linear, adapter, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, base.weight)
    if variant == "base":
        return y
    if variant in ("bdlora", "bdlora_same_rank"):
        return y + adapter.blocked_delta(x)  # what BdLoraAdapter.forward_site runs
    return y + adapter.delta(x)  # plain LoRA, and the dense block-diagonal reference


def run_layers(args, shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for layer, role, d_in, d_out in _layer_shapes(shape):
        base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
        _randomize(base, gen)
        for n in args.nblocks:
            r_bd = moelora.rank_for_budget(args.r, d_in, d_out, n, role)  # this linear's equal budget
            variants = _variants(base, role, args.r, r_bd, n, gen)
            for T in args.tokens:
                x = torch.randn(T, d_in, device=device, dtype=dtype, generator=gen)
                gy = torch.randn(T, d_out, device=device, dtype=dtype, generator=gen)
                bd = variants["bdlora"][1]
                with torch.no_grad():
                    diff = (bd.blocked_delta(x).float() - bd.delta(x).float()).abs().max().item()
                base_ms = {}
                for variant, (rank, adapter) in variants.items():
                    if variant == "base" and n != args.nblocks[0]:
                        continue  # the base does not depend on nblocks: measured once per shape
                    fwd = _median(lambda: _forward(variant, base, adapter, x), args, device, grad=False)
                    xg = x.detach().requires_grad_(True)  # the layer's input gradient, as in a model

                    def fwd_bwd():
                        _forward(variant, base, adapter, xg).backward(gy)

                    both = _median(fwd_bwd, args, device, grad=True)
                    if variant == "base":
                        base_ms[(layer, T)] = (fwd, both)
                    b_fwd, b_both = base_ms.get((layer, T)) or _base_of(rows, layer, T)
                    params = 0 if adapter is None else sum(p.numel() for p in adapter.parameters())
                    rows.append({"layer": layer, "role": role, "d_in": d_in, "d_out": d_out, "tokens": T, "nblocks": n,
                                 "variant": variant, "r": rank, "params": params, "fwd_ms": fwd,
                                 "fwd_ratio": fwd / b_fwd, "fwd_bwd_ms": both, "fwd_bwd_ratio": both / b_both,
                                 "max_abs_diff": diff if variant.startswith("bdlora") else None})
    return rows


def _base_of(rows: list[dict], layer: str, T: int) -> tuple[float, float]:
    row = next(r for r in rows if r["layer"] == layer and r["tokens"] == T and r["variant"] == "base")
    return row["fwd_ms"], row["fwd_bwd_ms"]


def _median(fn, args, device: torch.device, grad: bool) -> float:
    warm = max(args.warmup, 1)
    with torch.enable_grad() if grad else torch.no_grad():
        # back to back on CUDA: device time per call (a micro-benchmark; moelora.bench.timing)
        return statistics.median(time_ms(fn, warm, args.layer_repeats, device, back_to_back=True))


# ---- decode part --------------------------------------------------------------------------------
def decode_configs(args, shape: dict[str, int]) -> list[tuple[str, int, Any]]:
    """(method, nblocks, config or None) for every decode case."""
    E, k, r = args.num_experts, args.top_k, args.r
    cases: list[tuple[str, int, Any]] = []
    for m in args.methods:
        if m == "base":
            cases.append((m, 1, None))
        elif m == "lora":
            cases.append((m, 1, moelora.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0)))
        elif m == "mixlora":
            cases.append((m, 1, moelora.MixLoraConfig(num_experts=E, top_k=k, r=r, lora_alpha=2 * r, lora_dropout=0.0)))
        else:
            for n in args.nblocks:
                if m == "bdlora":
                    rb = budget_rank(shape, r, n)
                    cfg = moelora.BdLoraConfig(r=rb, lora_alpha=2 * rb, nblocks=n, lora_dropout=0.0)
                else:
                    rb = budget_rank(shape, r, n, experts=E)
                    cfg = moelora.MixLoraConfig(num_experts=E, top_k=k, r=rb, lora_alpha=2 * rb, lora_dropout=0.0,
                                                nblocks=n)
                cases.append((m, n, cfg))
    return cases


def run_decode(args, shape_name: str, device: torch.device, dtype: torch.dtype, t_start: float) -> tuple[list, dict]:
    model, _ = bench_models.build_shape_model(shape_name, str(dtype).removeprefix("torch."), str(device), args.seed)
    shape = bench_models.MODEL_SHAPES[shape_name]
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, shape["vocab_size"], (1, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    s = BenchSettings(new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    cases = decode_configs(args, shape)
    rows = []
    for rnd in range(args.rounds):
        for method, n, cfg in (cases if rnd % 2 == 0 else cases[::-1]):  # reversed rounds cancel linear drift
            row: dict[str, Any] = {"method": method, "nblocks": n, "r": getattr(cfg, "r", 0), "round": rnd}
            if args.time_budget_s is not None and time.monotonic() - t_start > args.time_budget_s:
                row["error"] = f"skipped: time budget of {args.time_budget_s:.0f} s used up"
                rows.append(row)
                continue
            try:
                if cfg is not None:
                    moelora.inject_adapter(model, cfg)
                    bench_models.randomize_adapter_(model, args.seed)
                    model.eval()
                row["trainable"] = moelora.trainable_parameters(model)["trainable"] if cfg is not None else 0
                pair = (lambda: moelora.disable_adapter(model)) if cfg is not None else None
                row.update(measure_case(model, ids, mask, "eager", s, base_of=pair))
            except Exception as err:  # noqa: BLE001 - recorded in the row, the run goes on
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            finally:
                if cfg is not None and moelora.adapter_state(model) is not None:
                    moelora.remove_adapter(model)
            rows.append(row)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return rows, {"model_weight_gb": round(weights / 1e9, 3), "model_shape": shape}


# ---- output ---------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_table(rows: list[dict], columns: tuple[str, ...]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, width))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, width)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.monotonic()
    device = bench_models.resolve_device(args.device)
    dtype = bench_models.resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    shape_name = MODELS[args.model]
    shape = bench_models.MODEL_SHAPES[shape_name]
    result: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items()},
        "environment": {"device": device_name(device), "device_type": device.type,
                        "dtype": str(dtype).removeprefix("torch."), **record_versions(default_command())},
        "layers": [], "decode": [],
    }
    out = Path(args.out) if args.out else None

    def write():
        if out is not None:
            write_json(out / "bdlora.json", result)
            write_csv(out / "bdlora_layers.csv", result["layers"], LAYER_COLUMNS)
            write_csv(out / "bdlora_decode.csv", result["decode"], DECODE_COLUMNS)

    if "layer" in args.parts:
        result["layers"] = run_layers(args, shape, device, dtype)
        write()
        print(format_table(result["layers"], LAYER_COLUMNS), flush=True)
    if "decode" in args.parts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with moelora.decode_graphs(args.decode_graphs):
            result["decode"], extra = run_decode(args, shape_name, device, dtype, t_start)
        result["environment"].update(extra)
        write()
        print(format_table(result["decode"], DECODE_COLUMNS), flush=True)
    result["environment"]["wall_s"] = round(time.monotonic() - t_start, 1)
    write()
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
