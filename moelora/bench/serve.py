"""Serving benchmark: S-LoRA's workload through ``moelora.serve.Engine`` in-process (no HTTP).

    python -m moelora.bench.serve --device cpu --model tiny --smoke --out results/serve_smoke
    python -m moelora.bench.serve --model llama2_7b_shape --num-adapters 1,10,100,1000 --out results/serve

Workload (S-LoRA, arXiv 2311.03285 §7.1): N adapters (LoRA ranks mixed from ``--ranks``, a
``--mixlora-share`` of them MixLoRA), Zipf(α) popularity over the adapters, Poisson or Gamma
(``--cv``) arrivals at each ``--rates`` (requests/s), prompt and output lengths uniform in
``--prompt-len`` / ``--output-len``; every request generates exactly its output length (no EOS).

Systems, in one process on the same base weights:
- ``moelora``: the engine (continuous batching, per-token adapter plan, registry with
  ``--max-resident`` device slots and LRU swapping from the host cache);
- ``base``: the same requests without adapters through the same engine (the upper bound);
- ``peft_swap``: PEFT's ``PeftModel``, one adapter per batch: the oldest arrived request's
  adapter is copied from host memory into the PEFT adapter of its rank (``set_adapter``), and the
  arrived requests of that adapter (up to ``--peft-batch``) run as one left-padded ``generate``
  (S-LoRA's PEFT baseline);
- ``peft_batched``: PEFT ``generate(adapter_names=...)`` on left-padded static batches of the
  oldest arrived requests whatever their adapters; PEFT holds every distinct weight set resident.
PEFT has no MixLoRA: in both PEFT systems a MixLoRA request runs as a LoRA of its rank (noted in
the results); PEFT rows report no TTFT/ITL (``generate`` returns whole batches).

Synthetic adapters (random weights, so nothing is skipped): per (method, rank) class,
``--weight-sets`` distinct host tensor sets are drawn once; adapter i shares the tensors of set
i mod that, so 1000 adapters of a 7B shape take a few GB of host memory, while every swap still
copies that adapter's full bytes into a device slot (counted in ``h2d_bytes``).

Bounding the run: ``--run-timeout`` stops a run (requests still unfinished are cancelled and
counted as such), ``--time-budget`` skips the runs left once the total is spent (rows say
``skipped``). Writes (after every run, ``"complete": true`` once all are done) ``serve_bench.json`` (settings, environment, every row, latency samples),
``serve_bench.csv``, and ``throughput_vs_adapters.png`` / ``latency_cdf.png`` when matplotlib
is installed, into ``--out``. Imports torch, transformers, numpy (and peft for the PEFT rows).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import moelora
from moelora.bench.jsonio import write_json
from moelora.bench.models import build_bench_model, resolve_device, resolve_dtype
from moelora.bench.output import environment, write_csv
from moelora.bench.timing import percentile

# the engine's host seconds of admission (moelora.serve.registry.RegistryStats; the model lock held by it)
ADMISSION_SECONDS = ("fill_s", "new_slot_s", "install_s", "drop_s", "admission_locked_s")
COLUMNS = ("system", "num_adapters", "alpha", "rate", "arrival", "status", "requests", "completed", "cancelled",
           "rejected", "no_first_token", "output_tokens", "wall_s", "output_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms",
           "itl_p50_ms", "itl_p99_ms", "latency_p50_s", "latency_p99_s", "swaps", "h2d_bytes",
           "peak_resident_slots", "max_adapters_per_step", "graph_captures", "peak_gpu_mem_gb", *ADMISSION_SECONDS,
           "admission_wait_p50_ms", "admission_wait_p99_ms", "step_ms_at_0", "step_ms_per_1k_tokens", "note")


@dataclass
class Req:
    arrival: float  # seconds after the run starts
    adapter: int  # index into the adapters, 0 = most popular
    prompt: list
    out_len: int


def _ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x != ""]


def _floats(s: str) -> list[float]:
    return [float(x) for x in str(s).split(",") if x != ""]


def _range(s: str) -> tuple[int, int]:
    lo, hi = _ints(s)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {s!r}")
    return lo, hi


def make_workload(n_adapters: int, alpha: float, rate: float, num_requests: int, prompt_len, output_len,
                  arrival: str, cv: float, vocab: int, seed: int) -> list[Req]:
    """S-LoRA's trace: Zipf(alpha) adapter popularity, Poisson or Gamma(cv) inter-arrival times
    at ``rate`` requests/s, uniform prompt/output lengths; deterministic in ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_adapters + 1) ** alpha
    adapters = rng.choice(n_adapters, size=num_requests, p=p / p.sum())
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=num_requests)
    else:  # Gamma with mean 1/rate and coefficient of variation cv (S-LoRA's bursty arrivals)
        k = 1.0 / cv ** 2
        gaps = rng.gamma(k, 1.0 / (rate * k), size=num_requests)
    t = np.cumsum(gaps) - gaps[0]
    plen = rng.integers(prompt_len[0], prompt_len[1] + 1, size=num_requests)
    olen = rng.integers(output_len[0], output_len[1] + 1, size=num_requests)
    return [Req(float(t[i]), int(adapters[i]), rng.integers(3, vocab, size=int(plen[i])).tolist(), int(olen[i]))
            for i in range(num_requests)]


# ---- synthetic adapters -------------------------------------------------------------------------
def adapter_classes(ranks: list[int], n: int, mixlora_share: float, experts: int, top_k: int,
                    mixlora_rank: int | None = None) -> list[dict]:
    """Adapter i's config dict: ranks cycle over ``ranks``; a ``mixlora_share`` of the adapters
    (spread over the popularity order, every 1/share-th) are MixLoRA with ``mixlora_rank`` per
    expert (default: the cycled rank; MixLoRA's paper uses 8-16: E experts of rank 64 would be an
    adapter of 1.5 GB at the 7B shape)."""
    out = []
    every = None if mixlora_share <= 0 else max(1, round(1 / mixlora_share))
    for i in range(n):
        r = ranks[i % len(ranks)]
        if every is not None and i % every == every - 1:
            r = mixlora_rank or r
            out.append(dict(method="mixlora", num_experts=experts, top_k=top_k, r=r, lora_alpha=2 * r, lora_dropout=0.0))
        else:
            out.append(dict(method="lora", r=r, lora_alpha=2 * r, lora_dropout=0.0))
    return out


def part_limits_gb(banks: dict) -> tuple[float, float]:
    """(max_adapter_gb, max_expert_gb) for ``Engine``: the largest plain-LoRA and MixLoRA expert
    part of one adapter of ``banks`` (``weight_banks``), with 1% to spare. The engine's memory plan
    sizes a mixed step's stacks when it starts; a benchmark adds its adapters after that, so it
    passes the limits (unset, a MixLoRA adapter added later may exceed them)."""
    from moelora.serve.registry import split_bytes

    parts = [split_bytes(b[0]) for b in banks.values()]
    return tuple(round(1.01 * max(p[i] for p in parts) / 2**30 + 1e-3, 3) for i in (0, 1))


@torch.no_grad()
def weight_banks(model, classes: list[dict], sets: int, pin: bool, seed: int) -> dict[str, list[dict]]:
    """Per distinct config: ``sets`` host tensor sets of its adapter (random: B too, routers
    with std 1/sqrt(fan_in)), made once through the public API (add, read, delete)."""
    import json

    banks: dict[str, list[dict]] = {}
    device = next(model.parameters()).device  # drawn on the device (fast), then moved to the host
    gen = torch.Generator(device=device).manual_seed(seed)
    for d in classes:
        key = json.dumps(d, sort_keys=True)
        if key in banks:
            continue
        cfg = moelora.config_from_dict(d)
        moelora.add_adapter(model, "_bench_shape", cfg, trainable=False)
        shapes = {k: (v.shape, v.dtype) for k, v in moelora.adapter_state_dict(model, "_bench_shape").items()}
        moelora.delete_adapter(model, "_bench_shape")
        banks[key] = []
        for _ in range(sets):
            ts = {}
            for k, (shape, dt) in shapes.items():
                std = 1.0 / math.sqrt(shape[-1]) if "router" in k else 0.02
                t = (torch.randn(shape, generator=gen, device=device) * std).to(dt).cpu()
                ts[k] = t.pin_memory() if pin else t
            banks[key].append(ts)
    return banks


# ---- the engine runs ------------------------------------------------------------------------------
async def _drive(engine, reqs: list[Req], names: list | None, timeout: float) -> dict[str, Any]:
    from moelora.serve import QueueFullError

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    recs: list[dict] = []
    live: dict[int, str] = {}
    rejected = 0

    async def one(i: int, r: Req) -> None:
        nonlocal rejected
        await asyncio.sleep(max(0.0, r.arrival - (time.perf_counter() - t0)))
        sent = time.perf_counter()
        try:
            rid = engine.submit(r.prompt, None if names is None else names[r.adapter], r.out_len,
                                eos_token_id=-1, loop=loop)
        except QueueFullError:
            rejected += 1
            return
        live[i] = rid
        # recorded as the tokens come: a request cut by the run's timeout still counts the tokens it got
        rec = {"sent": sent - t0, "times": [], "out_len": r.out_len, "done": False}
        recs.append(rec)
        async for chunk in engine.astream(rid, timeout=timeout):
            rec["times"].extend([time.perf_counter() - t0] * len(chunk))
        live.pop(i, None)
        rec["done"] = True

    tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(reqs)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for i, rid in list(live.items()):
        engine.cancel(rid)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()
    done_n = sum(1 for r in recs if r["done"])
    return {"records": recs, "rejected": rejected, "cancelled": len(reqs) - done_n - rejected,
            "status": "ok" if not pending else "timeout", "t0": t0}


def _summary(res: dict, n_requests: int) -> dict[str, Any]:
    """Output tokens and TTFT/ITL count every token delivered, also of requests the run's timeout
    cut (``done`` False: they are not ``completed`` and have no latency); ``no_first_token``: requests
    submitted that got none before the end."""
    recs = [r for r in res["records"] if r["times"]]
    done = [r for r in recs if r.get("done", True)]
    ttft = [(r["times"][0] - r["sent"]) * 1e3 for r in recs]
    itl = [(b - a) * 1e3 for r in recs for a, b in zip(r["times"], r["times"][1:])]
    lat = [r["times"][-1] - r["sent"] for r in done]
    tokens = sum(len(r["times"]) for r in recs)
    start = min((r["sent"] for r in res["records"]), default=0.0)
    end = max((r["times"][-1] for r in recs), default=start)
    wall = max(end - start, 1e-9)

    def q(xs, p):
        return round(percentile(xs, p), 3) if xs else None

    return {"requests": n_requests, "completed": len(done), "cancelled": res["cancelled"], "rejected": res["rejected"],
            "no_first_token": len(res["records"]) - len(recs),
            "output_tokens": tokens, "wall_s": round(wall, 3), "output_tok_s": round(tokens / wall, 2),
            "req_s": round(len(done) / wall, 3), "ttft_p50_ms": q(ttft, 0.5), "ttft_p99_ms": q(ttft, 0.99),
            "itl_p50_ms": q(itl, 0.5), "itl_p99_ms": q(itl, 0.99), "latency_p50_s": q(lat, 0.5),
            "latency_p99_s": q(lat, 0.99), "status": res["status"], "_ttft": ttft, "_itl": itl}


def _peak_mem(device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def run_engine(engine, reqs, names, timeout, device) -> dict[str, Any]:
    from moelora._private import triton_compiles
    from moelora.layers.decode_graphs import captures_total

    before = engine.metrics()
    graphs = captures_total()
    engine.registry.reset_peaks()
    engine.max_adapters_seen = 0
    engine._manager.step_times.reset()
    engine.admission_waits.clear()
    _reset_peak(device)
    with triton_compiles() as compiles:
        res = asyncio.run(_drive(engine, reqs, names, timeout))
    # requests cancelled at the timeout may still be leaving CB
    from moelora.serve.engine import wait_until

    wait_until(lambda: engine.pending() == 0, 30)
    after = engine.metrics()
    row = _summary(res, len(reqs))
    # every step of the run, on the requests' clock (the latency samples' sent/first-token times)
    row["_timeline"] = engine._manager.step_times.timeline(res["t0"])
    fit = after["step_times"].get("launch_ms_fit") or {}
    # a step's launch ms against its tokens: the slope is what a prefill token costs (the base's vs ours)
    row.update(step_ms_at_0=fit.get("ms_at_0"), step_ms_per_1k_tokens=fit.get("ms_per_1k_tokens"))
    row.update({k: round(after[k] - before[k], 3) for k in ADMISSION_SECONDS})
    row.update(swaps=after["swaps"] - before["swaps"], h2d_bytes=after["h2d_bytes"] - before["h2d_bytes"],
               peak_resident_slots=after["peak_resident_slots"], max_adapters_per_step=after["max_adapters_seen_per_step"],
               peak_gpu_mem_gb=_peak_mem(device), step_times=after["step_times"],
               # submit -> entering CB (waiting for a slot, the per-step caps, fairness): part of TTFT
               admission_wait_p50_ms=after["admission_wait_ms"].get("p50"),
               admission_wait_p99_ms=after["admission_wait_ms"].get("p99"),
               # decode graphs captured inside the timed run (0 after a complete warm-up: each one
               # is a step that waited for a capture)
               graph_captures=captures_total() - graphs,
               # Triton kernels compiled inside the timed run, with their seconds (0 after a complete
               # warm-up: each one is a step that waited for a compile)
               kernel_compiles=compiles.as_dict())
    return row


# ---- PEFT baselines -----------------------------------------------------------------------------
def _peft_setup(model, classes: list[dict], sets: int, pin: bool, seed: int, batched: bool):
    """A PeftModel with one LoRA adapter per rank (``peft_swap``: the slot a request's weights are
    copied into), or one per (rank, weight set) (``peft_batched``: all resident)."""
    from peft import LoraConfig, get_peft_model

    ranks = sorted({d["r"] for d in classes})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = [f"r{r}_{s}" for r in ranks for s in range(sets if batched else 1)]
    pm = None
    for nm in names:
        r = int(nm[1:].split("_")[0])
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=nm)
        else:
            pm.add_adapter(nm, cfg)
    pm.eval()
    # host copies to swap in (peft_swap): per rank, ``sets`` random weight sets of that adapter's tensors
    host: dict[int, list[list[tuple]]] = {}
    device = next(pm.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    if not batched:
        for r in ranks:
            params = [p for n, p in pm.named_parameters() if f".r{r}_0." in n + "."]
            host[r] = []
            for _ in range(sets):
                pairs = []
                for p in params:
                    t = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(p.dtype).cpu()
                    pairs.append((p, t.pin_memory() if pin else t))
                host[r].append(pairs)
    return pm, names, host


def run_peft(pm, names, host, classes, reqs: list[Req], batch: int, timeout: float, device, batched: bool,
             sets: int) -> dict[str, Any]:
    """Replays the trace in arrival time: whenever the model is free, the oldest arrived request
    picks the batch (its adapter's arrived requests for ``peft_swap``, any for ``peft_batched``)."""
    _reset_peak(device)
    pending = list(range(len(reqs)))
    t0 = time.perf_counter()
    recs, swaps, h2d, current = [], 0, 0, None
    status = "ok"
    while pending:
        now = time.perf_counter() - t0
        if now > timeout:
            status = "timeout"
            break
        arrived = [i for i in pending if reqs[i].arrival <= now]
        if not arrived:
            time.sleep(max(0.0, min(reqs[i].arrival for i in pending) - now))
            continue
        head = reqs[arrived[0]]
        if batched:
            chosen = arrived[:batch]
            adapter_names = [f"r{classes[reqs[i].adapter]['r']}_{reqs[i].adapter % sets}" for i in chosen]
        else:
            chosen = [i for i in arrived if reqs[i].adapter == head.adapter][:batch]
            r = classes[head.adapter]["r"]
            if current != head.adapter:  # swap: this adapter's weights from host memory into the rank's slot
                with torch.no_grad():
                    for p, t in host[r][head.adapter % sets]:
                        p.copy_(t, non_blocking=True)
                        h2d += t.numel() * t.element_size()
                pm.set_adapter(f"r{r}_0")
                swaps += 1
                current = head.adapter
        width = max(len(reqs[i].prompt) for i in chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        mask = torch.zeros(len(chosen), width, dtype=torch.long)
        for j, i in enumerate(chosen):  # left padding
            p = reqs[i].prompt
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        new = max(reqs[i].out_len for i in chosen)
        kw = dict(adapter_names=adapter_names) if batched else {}
        with torch.no_grad():
            pm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                        min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter() - t0
        for i in chosen:
            recs.append({"sent": reqs[i].arrival, "times": [end] * reqs[i].out_len, "out_len": reqs[i].out_len})
            pending.remove(i)
    res = {"records": recs, "rejected": 0, "cancelled": len(pending), "status": status}
    row = _summary(res, len(reqs))
    row.update(ttft_p50_ms=None, ttft_p99_ms=None, itl_p50_ms=None, itl_p99_ms=None, _ttft=[], _itl=[],
               swaps=swaps if not batched else 0, h2d_bytes=h2d, peak_gpu_mem_gb=_peak_mem(device))
    return row


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m moelora.bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, tiny_shape, llama2_7b_shape, or an HF folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--num-adapters", type=_ints, default=[1, 10, 100, 1000])
    ap.add_argument("--alpha", type=_floats, default=[0.5, 1.0], help="Zipf exponents")
    ap.add_argument("--rates", type=_floats, default=[2.0], help="arrival rates, requests/s")
    ap.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    ap.add_argument("--cv", type=float, default=2.0, help="Gamma arrivals: coefficient of variation")
    ap.add_argument("--num-requests", type=int, default=200, help="requests per run")
    ap.add_argument("--prompt-len", type=_range, default=(8, 512))
    ap.add_argument("--output-len", type=_range, default=(8, 512))
    ap.add_argument("--ranks", type=_ints, default=[8, 16, 32, 64])
    ap.add_argument("--mixlora-share", type=float, default=0.0, help="fraction of the adapters that are MixLoRA")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--mixlora-rank", type=int, default=16, help="MixLoRA rank per expert (0: the cycled rank)")
    ap.add_argument("--weight-sets", type=int, default=2, help="distinct random tensor sets per adapter config")
    ap.add_argument("--max-resident", type=int, default=32, help="device adapter slots")
    ap.add_argument("--adapter-memory-gb", type=float, default=None, help="slot pool bytes (CUDA: set aside from the KV cache)")
    ap.add_argument("--max-adapters-per-step", type=int, default=None)
    ap.add_argument("--max-mixlora-per-step", type=int, default=None,
                    help="of those, most MixLoRA adapters (their own stack positions: Engine(max_mixlora_per_step))")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per packed step (engine default 2048)")
    ap.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: the engine's memory plan)")
    ap.add_argument("--kv-memory-fraction", type=float, default=None,
                    help="at most this share of the free GPU memory for the KV cache (the plan may give less)")
    ap.add_argument("--step-memory-gb", type=float, default=None,
                    help="headroom for one step's activations (default: the engine's bound from max_batch_tokens)")
    ap.add_argument("--attn-implementation", default=None, help="sdpa (paged SDPA), paged|eager, flash_attention_2, ...")
    ap.add_argument("--base-cuda-graphs", action="store_true",
                    help="also run the base rows through a base-only engine with CB's CUDA graphs (system base_graphs)")
    ap.add_argument("--base-compile-level", type=int, default=0,
                    help="with --base-cuda-graphs: CB's torch.compile level of the base-only step (0-3)")
    ap.add_argument("--no-expandable-segments", action="store_true",
                    help="leave PYTORCH_CUDA_ALLOC_CONF alone (default: expandable_segments:True unless set)")
    ap.add_argument("--systems", default="base,moelora,peft_swap,peft_batched")
    ap.add_argument("--peft-batch", type=int, default=16, help="PEFT systems: most requests per batch")
    ap.add_argument("--run-timeout", type=float, default=60.0, help="seconds per run before it is cut")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for all runs; the rest are skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke sizes: N 1,4; 12 requests; short lengths")
    ap.add_argument("--out", default="results/serve_bench")
    a = ap.parse_args(argv)
    if a.smoke:
        a.num_adapters, a.alpha, a.rates, a.num_requests = [1, 4], [1.0], [50.0], 12
        a.prompt_len, a.output_len, a.ranks, a.max_resident = (4, 12), (2, 6), [2, 4], 2
        a.mixlora_share = a.mixlora_share or 0.5
        a.experts, a.mixlora_rank, a.peft_batch, a.run_timeout = 4, 4, 4, 60.0
    return a


def main(argv=None) -> dict[str, Any]:
    a = parse_args(argv)
    t_start = time.perf_counter()
    if not a.no_expandable_segments:  # before the first CUDA allocation: less fragmentation between slots and steps
        import os

        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    model = build_bench_model(a.model, device, dtype, a.seed)
    env = environment(model, device, None)
    vocab = model.config.vocab_size
    pin = device.type == "cuda"
    n_max = max(a.num_adapters)
    classes = adapter_classes(a.ranks, n_max, a.mixlora_share, a.experts, a.top_k, a.mixlora_rank)
    banks = weight_banks(model, classes, a.weight_sets, pin, a.seed)
    biggest = max(sum(t.numel() * t.element_size() for t in b[0].values()) for b in banks.values())

    max_adapter_gb, max_expert_gb = part_limits_gb(banks)
    if a.adapter_memory_gb is None and device.type == "cuda":
        # the engine's KV cache plan leaves this pool free
        a.adapter_memory_gb = round(1.05 * a.max_resident * biggest / 2**30, 3)
    systems = [s for s in a.systems.split(",") if s]
    rows: list[dict] = []
    samples: dict[str, dict] = {}
    build_s = round(time.perf_counter() - t_start, 1)

    def out_of_time() -> bool:
        return a.time_budget is not None and time.perf_counter() - t_start > a.time_budget

    def add(row: dict, **key) -> None:
        row = {**key, "arrival": a.arrival, **row}
        samples[f"{row['system']}|{row['num_adapters']}|{row['alpha']}|{row['rate']}"] = {
            "ttft_ms": row.pop("_ttft", []), "itl_ms": row.pop("_itl", []), "steps": row.pop("_timeline", [])}
        rows.append(row)
        save()  # after every run: a run killed from outside still leaves the rows so far
        print(" ".join(f"{k}={row.get(k)}" for k in ("system", "num_adapters", "alpha", "rate", "status",
                                                      "completed", "output_tok_s", "ttft_p50_ms", "itl_p50_ms",
                                                      "swaps")), flush=True)
        if row.get("step_times"):
            print("  step_times", row["step_times"], flush=True)
        if row.get("kernel_compiles"):
            print("  kernel_compiles", row["kernel_compiles"], flush=True)

    def result(final: bool = False) -> dict:
        return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()},
                "environment": {**env, "command": _command(argv)}, "build_s": build_s,
                "total_s": round(time.perf_counter() - t_start, 1), "complete": final, "rows": rows,
                "latency_samples": samples}

    def save(final: bool = False) -> dict:
        res = result(final)
        write_json(out / "serve_bench.json", res)
        write_csv(out / "serve_bench.csv", rows, COLUMNS)
        return res

    def skipped(**key) -> None:
        add({"status": "skipped", "note": "time budget spent"}, **key)

    traces = {(n, al, rate): make_workload(n, al, rate, a.num_requests, a.prompt_len, a.output_len, a.arrival,
                                           a.cv, vocab, a.seed + 7)
              for n in a.num_adapters for al in a.alpha for rate in a.rates}
    if "base" in systems or "moelora" in systems:
        from moelora.serve import Engine

        engine = Engine(model, max_pending=a.num_requests + 8, max_new_tokens=a.output_len[1],
                        context_len=a.prompt_len[1] + a.output_len[1] + 1, num_blocks=a.num_blocks,
                        max_batch_tokens=a.max_batch_tokens, kv_memory_fraction=a.kv_memory_fraction,
                        step_memory_gb=a.step_memory_gb, max_adapter_gb=max_adapter_gb, max_expert_gb=max_expert_gb,
                        max_resident_adapters=a.max_resident, adapter_memory_gb=a.adapter_memory_gb,
                        max_adapters_per_step=a.max_adapters_per_step,
                        max_mixlora_per_step=a.max_mixlora_per_step, attn_implementation=a.attn_implementation)
        env["attn_implementation"] = engine.attn_implementation
        env["memory_plan"] = None if engine.memory_plan is None else engine.memory_plan.as_dict()
        env["max_adapters_per_step"] = engine.max_adapters_per_step
        env["max_mixlora_per_step"] = engine.max_mixlora_per_step
        env["pytorch_cuda_alloc_conf"] = __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF")
        import json

        for i, d in enumerate(classes):
            key = json.dumps(d, sort_keys=True)
            engine.add_adapter_tensors(f"a{i}", moelora.config_from_dict(d), banks[key][i % a.weight_sets])
        names = [f"a{i}" for i in range(n_max)]
        # the serving-step graphs of every token bucket, captured before any run (as a server does at start)
        env["engine_warmup"] = engine.warmup()
        print("engine warm-up:", env["engine_warmup"], flush=True)
        # warm-up (not recorded): the first packed steps pay one-time costs (the KV cache's first
        # touch, kernel selection, the first slots) that would otherwise land on the first run
        warm = make_workload(min(n_max, a.max_resident), 1.0, 1e6, 8, a.prompt_len, (2, 4), "poisson", 1.0, vocab, a.seed)
        run_engine(engine, warm, None, a.run_timeout, device)
        run_engine(engine, warm, names, a.run_timeout, device)
        try:
            if "base" in systems:
                for rate in a.rates:
                    k = dict(system="base", num_adapters=0, alpha=None, rate=rate)
                    if out_of_time():
                        skipped(**k)
                        continue
                    reqs = traces[(a.num_adapters[0], a.alpha[0], rate)]
                    add(run_engine(engine, reqs, None, a.run_timeout, device), **k)
            if "moelora" in systems:
                for (n, al, rate), reqs in traces.items():
                    k = dict(system="moelora", num_adapters=n, alpha=al, rate=rate)
                    if out_of_time():
                        skipped(**k)
                        continue
                    add(run_engine(engine, reqs, names, a.run_timeout, device), **k)
        finally:
            engine.close()
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if a.base_cuda_graphs and "base" in systems:
        run_base_graphs(a, model, traces, device, add, skipped, out_of_time)
    for system in ("peft_swap", "peft_batched"):
        if system not in systems:
            continue
        batched = system == "peft_batched"
        try:
            pm, pnames, host = _peft_setup(model, classes, a.weight_sets, pin, a.seed, batched)
        except ImportError as e:
            for (n, al, rate) in traces:
                add({"status": "skipped", "note": f"peft not installed ({e})"}, system=system, num_adapters=n,
                    alpha=al, rate=rate)
            continue
        with torch.no_grad():  # warm-up (not recorded)
            pm.generate(input_ids=torch.ones(2, 8, dtype=torch.long, device=device), max_new_tokens=2,
                        do_sample=False, pad_token_id=0, **({"adapter_names": pnames[:1] * 2} if batched else {}))
        note = "MixLoRA requests run as LoRA of their rank (PEFT has no MixLoRA)" if a.mixlora_share > 0 else None
        if batched:
            note = "; ".join(x for x in (note, f"N adapters folded onto {len(pnames)} resident PEFT adapters "
                                               "(rank x weight set)") if x)
        for (n, al, rate), reqs in traces.items():
            k = dict(system=system, num_adapters=n, alpha=al, rate=rate)
            if out_of_time():
                skipped(**k)
                continue
            row = run_peft(pm, pnames, host, classes, reqs, a.peft_batch, a.run_timeout, device, batched,
                           a.weight_sets)
            row["note"] = note
            add(row, **k)
        model = pm.unload()  # the plain base again for the next PEFT system
        del pm, host
        gc.collect()
    res = save(final=True)
    res["plots"] = [str(p) for p in write_plots(rows, samples, out)]
    return res


def run_base_graphs(a, model, traces, device, add, skipped, out_of_time) -> None:
    """The base rows again through an engine that serves the base only, with CB's CUDA graphs of
    the step on (system ``base_graphs``): what the step costs without eager launches."""
    from moelora.serve import Engine

    engine = Engine(model, max_pending=a.num_requests + 8, max_new_tokens=a.output_len[1],
                    context_len=a.prompt_len[1] + a.output_len[1] + 1, num_blocks=a.num_blocks,
                    max_batch_tokens=a.max_batch_tokens, kv_memory_fraction=a.kv_memory_fraction,
                    step_memory_gb=a.step_memory_gb, max_resident_adapters=1, adapter_memory_gb=0.001,
                    attn_implementation=a.attn_implementation, cuda_graphs=True,
                    compile_level=a.base_compile_level)
    try:
        warm = make_workload(1, 1.0, 1e6, 8, a.prompt_len, (2, 4), "poisson", 1.0, model.config.vocab_size, a.seed)
        run_engine(engine, warm, None, a.run_timeout, device)
        for rate in a.rates:
            k = dict(system="base_graphs", num_adapters=0, alpha=None, rate=rate)
            if out_of_time():
                skipped(**k)
                continue
            add(run_engine(engine, traces[(a.num_adapters[0], a.alpha[0], rate)], None, a.run_timeout, device), **k)
    finally:
        engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _command(argv) -> str:
    import shlex

    from moelora.bench.versions import default_command

    return default_command() if argv is None else shlex.join(["python", "-m", "moelora.bench.serve", *argv])


def write_plots(rows: list[dict], samples: dict, out: Path) -> list[Path]:
    """Throughput vs number of adapters (per system, alpha, rate) and the TTFT CDF of each run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    series: dict[tuple, list] = {}
    for r in rows:
        if r.get("status") in ("ok", "timeout") and r.get("output_tok_s") is not None:
            series.setdefault((r["system"], r["alpha"], r["rate"]), []).append((max(r["num_adapters"], 1), r["output_tok_s"]))
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for (system, al, rate), pts in sorted(series.items(), key=str):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{system} a={al} rate={rate}")
    paths.append(_save_log_x(plt, fig, ax, "adapters (base: plotted at 1)", "output tokens/s",
                             out / "throughput_vs_adapters.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, s in sorted(samples.items()):
        xs = sorted(s["ttft_ms"])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=key)
    paths.append(_save_log_x(plt, fig, ax, "TTFT (ms)", "fraction of requests", out / "latency_cdf.png"))
    if any(s.get("steps") for s in samples.values()):
        # each engine run's steps over time: tokens per step (queued prefill shows as tall steps)
        # and their launch ms (where a TTFT is spent)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for key, s in sorted(samples.items()):
            st = s.get("steps") or []
            if st:
                t = [x["t_s"] for x in st]
                top.plot(t, [x["tokens"] for x in st], marker=".", lw=0.8, label=key)
                bottom.plot(t, [x["launch_ms"] for x in st], marker=".", lw=0.8, label=key)
        top.set_ylabel("tokens per step")
        bottom.set_ylabel("step launch (ms)")
        bottom.set_xlabel("seconds since the run's first request")
        top.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "step_timeline.png", dpi=120)
        plt.close(fig)
        paths.append(out / "step_timeline.png")
    return paths


def _save_log_x(plt, fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    """The two plots' common finish: log x axis, labels, legend, saved and closed."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli() -> None:
    res = main()
    print(f"wrote {res['settings']['out']}/serve_bench.json ({len(res['rows'])} rows, {res['total_s']} s)")


if __name__ == "__main__":
    sys.exit(cli())
