"""Decode latency of a batch whose sequences use different adapters (S-LoRA-style serving).

One frozen base with ``--adapters`` LoRA adapters (rank ``--r`` on all seven linears); a batch of
``--batch`` sequences decodes with

- ``base``: the plain base model (``moelora.disable_adapter``: its own modules);
- ``single``: every sequence on adapter 0 (the single-adapter batch);
- ``mixed``: sequence i on adapter i mod A (``model.generate(..., adapter_names=[...])``);

and the same three cases with PEFT (``peft_model.generate(adapter_names=[...])``) on an
identical copy of the base, in the same process. Decode ms/token = (t(N+1 new) - t(1 new)) / N
of plain ``model.generate`` calls (greedy), median over ``--repeats``, the cases of one round
taken in alternating order, ``--rounds`` rounds. Before timing, the mixed batch's first-token
logits are compared with each sequence run alone with its adapter (``max_abs_diff``).

    python -m moelora.bench.multi_adapter --out results/multi_adapter               # H200: 7B shape
    python -m moelora.bench.multi_adapter --shape tiny_shape --new-tokens 4 --out /tmp/ma   # CPU smoke

Writes ``multi_adapter.json`` (settings, versions, device, command, every row) and
``multi_adapter.csv`` into ``--out`` and prints the table last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import moelora
from moelora.bench.jsonio import write_json
from moelora.bench.models import build_shape_model, randomize_adapter_, randomize_peft_lora_
from moelora.bench.output import write_csv
from moelora.bench.profiling import profile_call
from moelora.bench.timing import time_call_ms
from moelora.bench.versions import record_versions

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _generate(model, ids, mask, n_new: int, mode: str, cache, **kw) -> None:
    args: dict[str, Any] = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    if mode == "static":
        cache.reset()
        args["past_key_values"] = cache
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **args, **kw)


def _profile(gen: Callable[[int], None], n: int, device, path: Path) -> dict[str, Any]:
    """One ``gen(n)`` under torch.profiler (``profiling.profile_call``)."""
    return {"new_tokens": n, **profile_call(lambda: gen(n), device, path)}


def _ms_per_token(gen: Callable[[int], None], n: int, device) -> float:
    t1 = time_call_ms(lambda: gen(1), device)
    tn = time_call_ms(lambda: gen(n + 1), device)
    return (tn - t1) / n


def _moelora_cases(model, names: list[str], ids, mask, mode: str, cache) -> dict[str, Callable[[int], None]]:
    def base(n):
        with moelora.disable_adapter(model):
            _generate(model, ids, mask, n, mode, cache)

    return {
        "base": base,
        "moelora_single": lambda n: _generate(model, ids, mask, n, mode, cache, adapter_names=[names[0]] * len(ids)),
        "moelora_mixed": lambda n: _generate(model, ids, mask, n, mode, cache,
                                             adapter_names=[names[i % len(names)] for i in range(len(ids))]),
    }


def _peft_cases(pm, names: list[str], ids, mask) -> dict[str, Callable[[int], None]]:
    def single(n):
        pm.set_adapter(names[0])
        _generate(pm, ids, mask, n, "eager", None)

    return {
        "peft_single": single,
        "peft_mixed": lambda n: _generate(pm, ids, mask, n, "eager", None,
                                          adapter_names=[names[i % len(names)] for i in range(len(ids))]),
    }


def _check_mixed(model, names, ids, mask) -> float:
    """max |mixed-batch logits - each row alone| of the prompt's last token."""
    with torch.no_grad():
        rows = [names[i % len(names)] for i in range(len(ids))]
        mixed = model(ids, attention_mask=mask, adapter_names=rows).logits[:, -1].float()
        alone = torch.cat([model(ids[i:i + 1], attention_mask=mask[i:i + 1], adapter_names=[rows[i]]).logits[:, -1]
                           for i in range(len(ids))]).float()
    return float((mixed - alone).abs().max())


def run(a: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)
    layers = {"num_hidden_layers": a.layers} if a.layers else {}
    model, _ = build_shape_model(a.shape, str(dtype).removeprefix("torch."), device.type, a.seed, **layers)
    names = [f"a{i}" for i in range(a.adapters)]
    for i, n in enumerate(names):
        cfg = moelora.LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=LINEARS)
        (moelora.inject_adapter(model, cfg, adapter_name=n) if i == 0 else moelora.add_adapter(model, n, cfg))
    randomize_adapter_(model, a.seed)
    model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    ids = torch.randint(3, vocab, (a.batch, a.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    result: dict[str, Any] = {"settings": vars(a), "environment": record_versions(), "device": str(device),
                              "rows": [], "checks": {}}
    result["checks"]["moelora_mixed_vs_alone_max_abs_diff"] = _check_mixed(model, names, ids, mask)
    peft_model = None
    if a.peft:
        import peft

        base2, _ = build_shape_model(a.shape, str(dtype).removeprefix("torch."), device.type, a.seed, **layers)
        lcfg = dict(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=list(LINEARS))
        peft_model = peft.get_peft_model(base2, peft.LoraConfig(**lcfg), adapter_name=names[0])
        for n in names[1:]:
            peft_model.add_adapter(n, peft.LoraConfig(**lcfg))
        randomize_peft_lora_(peft_model, a.seed + 7)
        peft_model.eval()
        result["environment"]["peft"] = peft.__version__
    samples: dict[tuple[str, str], list[float]] = {}
    for mode in a.modes:
        cache = None
        if mode == "static":
            from transformers import StaticCache

            cache = StaticCache(config=model.config, max_cache_len=a.prompt + a.new_tokens + 8)
        cases = _moelora_cases(model, names, ids, mask, mode, cache)
        if peft_model is not None and mode == "eager":
            cases.update(_peft_cases(peft_model, names, ids, mask))
        for name, fn in cases.items():  # warm-up: compile, autotune, capture graphs
            try:
                fn(2)
                fn(a.new_tokens + 1)
            except Exception as err:  # noqa: BLE001 - a case that cannot run is reported, not fatal
                result["rows"].append({"mode": mode, "case": name, "error": f"{type(err).__name__}: {err}"[:500]})
                cases[name] = None
        live = {k: v for k, v in cases.items() if v is not None}
        for rnd in range(a.rounds):
            order = list(live.items()) if rnd % 2 == 0 else list(reversed(live.items()))
            for _ in range(a.repeats):
                for name, fn in order:
                    samples.setdefault((mode, name), []).append(_ms_per_token(fn, a.new_tokens, device))
        if a.profile:  # after the timing, so that the profiler's overhead is in no timed sample
            for name, fn in live.items():
                result.setdefault("profiles", {})[f"{mode}/{name}"] = _profile(
                    fn, a.new_tokens + 1, device, Path(a.out) / f"profile_{mode}_{name}.txt")
        if cache is not None:
            del cache
    for (mode, name), vals in samples.items():
        med = statistics.median(vals)
        base = statistics.median(samples[(mode, "base")])
        ref = None if name == "base" else samples.get((mode, "moelora_single" if name.startswith("moelora")
                                                       else "peft_single"))
        result["rows"].append({"mode": mode, "case": name, "batch": a.batch, "adapters": a.adapters, "r": a.r,
                               "ms_per_token": med, "min": min(vals), "max": max(vals), "n": len(vals),
                               "x_base": med / base,
                               "x_single": None if ref is None else med / statistics.median(ref)})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "multi_adapter.json", result)
    write_csv(out / "multi_adapter.csv", [r for r in result["rows"] if "error" not in r])
    return result


def _table(result: dict) -> str:
    env = result["environment"]
    lines = [f"device: {env.get('gpu') or result['device']}  torch {env.get('torch')}  transformers "
             f"{env.get('transformers')}  peft {env.get('peft')}  moelora {env.get('moelora')} "
             f"({env.get('git_commit')})", f"command: {env.get('command')}",
             f"mixed vs alone, max |Δlogit|: {result['checks']['moelora_mixed_vs_alone_max_abs_diff']:.3g}",
             "| mode | case | ms/token (min–max) | × base | × single-adapter batch |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['case']} | error: {r['error'][:120]} | | |")
            continue
        xs = "" if r["x_single"] is None else f"{r['x_single']:.2f}"
        lines.append(f"| {r['mode']} | {r['case']} | {r['ms_per_token']:.2f} ({r['min']:.2f}–{r['max']:.2f}) | "
                     f"{r['x_base']:.2f} | {xs} |")
    for key, pr in result.get("profiles", {}).items():
        busy = "" if pr["device_busy_ms"] is None else f", device busy {pr['device_busy_ms']:.1f} ms"
        lines.append(f"profile {key}: {pr['new_tokens']} new tokens in {pr['wall_ms']:.1f} ms{busy}, "
                     f"{pr['aten_ops']} aten ops ({pr['table']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m moelora.bench.multi_adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama2_7b_shape", help="a moelora.bench.models.MODEL_SHAPES name")
    p.add_argument("--layers", type=int, default=None,
                   help="fewer decoder layers than the shape has (compiling the static mode takes minutes at 32)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", type=lambda s: s.split(","), default=["eager", "static"],
                   help="comma list of eager (dynamic cache, decode graphs) and static (static cache, compiled)")
    p.add_argument("--no-peft", dest="peft", action="store_false", help="skip the PEFT cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, one generate per case under torch.profiler: wall vs device-busy ms and "
                        "aten ops (profiles in the JSON, op tables in profile_<mode>_<case>.txt)")
    p.add_argument("--out", default="multi_adapter_results")
    a = p.parse_args(argv)
    if a.adapters < 1 or a.batch < 1 or a.new_tokens < 1:
        p.error("--adapters, --batch and --new-tokens must be >= 1")
    res = run(a)
    print(_table(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
