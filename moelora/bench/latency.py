"""Decode-latency benchmark: base vs LoRA vs MixLoRA vs LoRA-Switch vs reference MixLoRA.

Method (docs/anchors.md): one process, one base model whose weights every method reuses
(inject -> measure -> remove), the same random prompts for every method, warm-up first, CUDA
events on GPU, greedy decoding with ``min_new_tokens = max_new_tokens`` so every run decodes the
same count. Per case (method, mode, batch size B, prompt length P):

- ``prefill_ms``: median time of ``generate(1 new token)`` (prefill + one sampling step);
- ``decode_ms_per_token`` = median over repeats of (t(N+1 new) - t(1 new)) / N;
- ``step_ms_p50`` / ``step_ms_p90``: per decode step, from a logits-processor hook that records a
  CUDA event (or a clock reading on CPU) each step of the N+1 run: N steps per repeat, pooled;
- ``decode_tokens_per_s`` = B * N / (t(N+1) - t(1)); ``peak_mem_mb``: CUDA max allocated over the
  timed runs (on CPU: the process's max RSS);
- ratios to ``base`` measured in the same process, same mode (``*_ratio``) and to base eager
  (``decode_ratio_vs_base_eager``, the docs/anchors.md column); ``reference_speedup``: how many times
  faster than the reference MixLoRA (eager, same B/P) the row decodes;
- ``decode_ms_best`` = (min t(N+1) - min t(1)) / N over the repeats (the ``_best`` ratios use it):
  on a shared host interference only adds time, so the fastest runs estimate the cost of the code
  itself and the median what a user of that host gets; both are reported. A repeat whose
  difference is <= 0 (prefill noise above the decode time) is counted in ``nonpositive_repeats``
  with a warning and left out of the paired ratio;
- ``cudagraph_records`` / ``cudagraph_records_per_call`` (compiled modes): CUDA graphs recorded by
  cudagraph trees during the timed repeats (after the warm-up, which records the first), total and
  per generate call: a re-record per call ("static input data pointer changed") shows here;
- ``hf_generate_ms_per_token`` (base rows): the same (t(N+1) - t(1)) / N timed around a plain
  ``generate`` without the step timer, interleaved with the timed runs; ``harness_ratio`` is the
  harness's decode time over it (what the per-step CUDA events cost).

**Paired** (``paired``, eager mode): every repeat of an adapted method is paired with a repeat of
the plain base model right before or after it (alternating), the adapter swapped out for it with
``moelora.disable_adapter`` (the reference package's modules likewise): ``decode_ratio_paired`` is
the median of the per-pair ratios and ``reference_speedup_paired`` the reference's paired ratio
over the row's, so host drift between cases cancels.

**Rounds** (``rounds > 1``): eager decoding at small batch is host-bound, and a lent machine's
host speed drifts by tens of percent over minutes (experiments/2026-12-01_decode_graphs_h200:
base eager 23-33 ms/token between calls). The whole method loop then runs ``rounds`` times, in
reverse order every other round (base, A, B, ... then ..., B, A, base), each round's ratios
against that round's base; ``result["summary"]`` holds per case the median over rounds of the
decode time and of the per-round ratios, with their min/max (linear drift cancels between a
forward and a reverse round).

Modes: ``eager`` (dynamic cache), ``static`` (a StaticCache kept per batch size and reset for
every generate call, as a server keeps its KV cache; transformers auto-compiles the decode
forward on CUDA with CUDA graphs), ``static_new`` (plain ``generate(cache_implementation="static")``
as users call it: the cache is generate's own, a new one per call for the plain base model, the
reused one of ``moelora/_private.ReusedStaticCache`` for adapted models), ``compile`` (static cache + an explicit ``torch.compile`` of
the forward, ``compile_mode``). A failing case (compile error, OOM, timeout) is recorded in its
row and the run goes on; the other cases of that method and mode are then skipped.

This module imports nothing from hydra / lm-eval / datasets (the GPU machine lacks them); its
command line is ``python -m moelora.bench`` (``moelora.bench.cli``)::

    python -m moelora.bench --model llama2_7b_shape --methods base,lora,mixlora \\
        --batch-sizes 1,8,32 --prompt-len 64 --new-tokens 128 --modes eager,static --out DIR
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

import torch

from moelora import _private
from moelora.bench import _moelora_internals as internals
from moelora.bench import _transformers_private as hf_private
from moelora.bench import models as bench_models
from moelora.bench import output as bench_output
from moelora.bench.settings import BenchSettings
from moelora.bench.timing import median_or_none, percentile, time_call_ms
from moelora.bench.versions import default_command

log = logging.getLogger("moelora.bench")


class CaseTimeout(RuntimeError):
    """A case ran past ``case_timeout_s``."""


class StepTimer:
    """A logits processor: called once per generated token, it stamps the time (a CUDA event on
    GPU, so the stream is not synchronised) and enforces the case deadline."""

    def __init__(self, device: torch.device, deadline: float) -> None:
        self.cuda = device.type == "cuda"
        self.deadline = deadline
        self.stamps: list[Any] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps.append(ev)
        else:
            self.stamps.append(time.perf_counter())
        if time.monotonic() > self.deadline:
            raise CaseTimeout("case timeout reached while generating")
        return scores

    def step_ms(self) -> list[float]:
        """Times between consecutive tokens: one decode step each."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def _generate(model, ids, mask, n_new: int, mode: str, timer: StepTimer | None) -> None:
    """One greedy generate of exactly ``n_new`` tokens; ``timer=None``: plain HF generate."""
    from transformers import LogitsProcessorList

    kwargs: dict[str, Any] = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True,
                                  pad_token_id=0)
    if timer is not None:
        kwargs["logits_processor"] = LogitsProcessorList([timer])
    if mode in ("static", "compile"):
        kwargs["past_key_values"] = _static_cache(model, ids.shape[0])
    elif mode == "static_new":
        kwargs["cache_implementation"] = "static"  # the user path: generate makes (or reuses) the cache
    if mode == "compile":
        kwargs["disable_compile"] = True  # we compiled the forward ourselves
    # no_grad, not inference_mode: LoRA-Switch keeps merge buffers across calls, and inference
    # tensors could not be updated in place by a later call outside inference mode.
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def _static_cache(model, batch: int):
    """One StaticCache per batch size, reset and reused by every generate call of a case.

    ``cache_implementation="static"`` makes generate allocate a new cache per call; when the new
    KV tensors land at other addresses, CUDA-graph trees re-record the decode graph (the cache is
    a static input; TORCH_LOGS=+cudagraphs: "static input data pointer changed"). Measured on the
    H100 at the Llama-2-7B shape: ~70-160 ms per call for MixLoRA and LoRA-Switch; on the H200
    (4-layer 7B-wide model, transformers 5.17) for the base too. A server keeps its KV cache, so
    the benchmark does too; adapted models now also reuse one cache on the user path
    (``_private.ReusedStaticCache``), which mode ``static_new`` measures."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_bench_static_caches", {})
    if batch not in caches:
        caches[batch] = StaticCache(config=model.config, max_cache_len=hf_private.static_cache_length(model))
    cache = caches[batch]
    cache.reset()
    return cache


def timed_generate(model, ids, mask, n_new: int, mode: str, deadline: float,
                   stamps: bool = True) -> tuple[float, list[float]]:
    """(ms of one generate of ``n_new`` tokens, per-step ms); ``stamps=False``: plain generate,
    no per-step times. ``deadline``: ``time.monotonic()`` after which it raises CaseTimeout."""
    timer = StepTimer(ids.device, deadline) if stamps else None
    ms = time_call_ms(lambda: _generate(model, ids, mask, n_new, mode, timer), ids.device)
    return ms, timer.step_ms() if timer else []


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_case(model, ids: torch.Tensor, mask: torch.Tensor, mode: str, s: BenchSettings,
                 plain: bool = False, base_of: Callable[[], ContextManager[Any]] | None = None) -> dict[str, Any]:
    """Time one (method, mode, B, P) case; see the module docstring for the numbers.
    ``plain``: also time plain generate (no step timer), each repeat right after the timed one.
    ``base_of``: a context manager factory under which the model is the plain base: each repeat
    is then paired with a base repeat, before it on odd repeats and after it on even ones."""
    n = s.new_tokens
    deadline = time.monotonic() + s.case_timeout_s
    calls = [0]  # generate calls of the timed repeats (the denominator of cudagraph_records_per_call)

    def timed(n_new: int, stamps: bool = True) -> tuple[float, list[float]]:
        calls[0] += 1
        return timed_generate(model, ids, mask, n_new, mode, deadline, stamps)

    def one_decode(stamps: bool = True) -> float:
        """(t(N+1 new) - t(1 new)) / N from one prefill-only run and one long run."""
        t1 = timed(1, stamps)[0]
        return (timed(n + 1, stamps)[0] - t1) / n

    def base_decode() -> float:
        with base_of():
            return one_decode()

    for _ in range(s.warmup):  # the long run first: the static cache keeps its larger size
        timed_generate(model, ids, mask, n + 1, mode, deadline)
        timed_generate(model, ids, mask, 1, mode, deadline)
        if base_of is not None:
            base_decode()
    if ids.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ids.device)
    t1s, tns, steps, plain_decode, started, paired = [], [], [], [], [], []
    calls[0] = 0
    with _private.cudagraph_records() as records:
        for i in range(s.repeats):
            started.append(round(time.time(), 3))  # wall clock: lines the repeats up with nvidia-smi dmon / host logs
            before = base_decode() if base_of is not None and i % 2 else None
            t1s.append(timed(1)[0])
            tn, st = timed(n + 1)
            tns.append(tn)
            steps += st
            if base_of is not None:
                paired.append(before if before is not None else base_decode())
            if plain:
                plain_decode.append(one_decode(stamps=False))
    repeats = [(tn - t1) / n for tn, t1 in zip(tns, t1s)]
    decode = statistics.median(repeats)
    B = ids.shape[0]
    extra: dict[str, Any] = {}
    noisy = sum(r <= 0 for r in repeats + paired)
    if noisy:  # a prefill slower than the whole (N+1)-token run: noise larger than the signal
        log.warning("%d repeat(s) measured a decode time <= 0 (prefill noise above the decode time): "
                    "raise new_tokens or repeats, or quiet the machine", noisy)
        extra["nonpositive_repeats"] = noisy
    if mode != "eager":
        extra.update(cudagraph_records=records.count, cudagraph_records_per_call=records.count / max(calls[0], 1))
    if plain_decode:
        hf = statistics.median(plain_decode)
        extra.update(hf_generate_ms_per_token=hf, harness_ratio=decode / hf if hf > 0 else None)
    if paired:
        extra.update(paired_base_ms_per_token=statistics.median(paired), paired_base_ms_repeats=paired,
                     decode_ratio_paired=median_or_none([r / b for r, b in zip(repeats, paired) if r > 0 and b > 0]))
    return {
        "prefill_ms": statistics.median(t1s),
        "total_ms": statistics.median(tns),
        "decode_ms_per_token": decode,
        "step_ms_p50": percentile(steps, 0.5) if steps else None,
        "step_ms_p90": percentile(steps, 0.9) if steps else None,
        "decode_tokens_per_s": B * 1e3 / decode if decode > 0 else None,
        "peak_mem_mb": _peak_mem_mb(ids.device),
        "decode_graphs": internals.captured_graphs(model),  # CUDA graphs of eager decode steps held by the adapters
        # interference only adds time: the fastest long run minus the fastest prefill-only run
        "decode_ms_best": (min(tns) - min(t1s)) / n,
        "decode_ms_repeats": repeats,  # the spread behind the median (bench.json only)
        "repeat_started_at": started,  # unix time of each repeat (bench.json only)
        **extra,
    }


def _switch_stats(model, ids, mask, mode: str, s: BenchSettings) -> dict[str, Any]:
    """LoRA-Switch merge mode, batch 1: the share of decode steps whose selection changed (the
    steps that pay for a merge; the others are skipped in-kernel), from one extra untimed run."""
    if ids.shape[0] != 1:
        return {}
    deadline = time.monotonic() + s.case_timeout_s
    rate = internals.selection_change_rate(
        model, lambda: timed_generate(model, ids, mask, s.new_tokens + 1, mode, deadline))
    return {} if rate is None else {"selection_change_rate": rate}


# ---- mode set-up ------------------------------------------------------------------------------
def reset_compiled(model) -> None:
    """Forget compiled graphs and the static-cache size between methods and modes: a method must
    not inherit another's graphs, and every method gets the same cache length."""
    hf_private.forget_generate_state(model)
    for attr in ("forward", "_bench_static_caches"):  # our torch.compile wrapper, our static caches
        model.__dict__.pop(attr, None)
    torch.compiler.reset()


def enter_mode(model, mode: str, s: BenchSettings) -> None:
    """Set ``model`` up for ``mode`` (after ``reset_compiled``)."""
    reset_compiled(model)
    # The static cache keeps the largest length it has seen; fix it for every case and method so
    # attention over the cache costs the same everywhere (and no case recompiles for a new size).
    hf_private.set_static_cache_length(model, max(s.prompt_lens) + s.new_tokens + 1)
    if mode == "compile":
        model.forward = torch.compile(model.forward, mode=s.compile_mode)


@torch.no_grad()
def weight_fingerprint(model) -> torch.Tensor:
    """A cheap checksum of the base weights (every 997th element of each, summed in fp64): a
    method that leaves merged deltas behind would skew every method measured after it."""
    return torch.stack([p.detach().reshape(-1)[::997].double().sum() for n, p in model.named_parameters()
                        if "lora_" not in n and "router" not in n]).cpu()


def prompts_for(s: BenchSettings, vocab_size: int, device: torch.device) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """The same random prompts (ids >= 4: no special tokens) for every method: {(B, P): (ids, mask)}."""
    out = {}
    for P in s.prompt_lens:
        for B in s.batch_sizes:
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + B * 1009 + P)
            ids = torch.randint(4, vocab_size, (B, P), generator=g)
            out[(B, P)] = (ids.to(device), torch.ones_like(ids).to(device))
    return out


# ---- the run ----------------------------------------------------------------------------------
def run_benchmark(s: BenchSettings) -> dict[str, Any]:
    """Measure every (method, mode, B, P); write bench.json/.csv/plots to ``s.out_dir`` if set
    (JSON and CSV after every case, so a killed run keeps what it measured). Returns
    ``{"settings", "environment", "rows"}`` (+ ``"summary"`` when ``rounds > 1``)."""
    s.validate()
    with internals.decode_graphs(s.decode_graphs):
        return _run(s)


def _run(s: BenchSettings) -> dict[str, Any]:
    t_start = time.monotonic()
    device = bench_models.resolve_device(s.device)
    dtype = bench_models.resolve_dtype(s.dtype, device)
    adapters = s.adapter_configs()
    torch.manual_seed(s.seed)
    model = bench_models.build_bench_model(s.model, device, dtype, s.seed)
    env = bench_output.environment(model, device, s.command or default_command())
    result: dict[str, Any] = {"settings": s.record(), "environment": env, "rows": []}
    prompts = prompts_for(s, model.config.vocab_size, device)
    out = Path(s.out_dir) if s.out_dir else None
    fingerprint = weight_fingerprint(model)
    env["base_weights_unchanged"] = {}

    for rnd in range(s.rounds):
        order = s.methods if rnd % 2 == 0 else s.methods[::-1]  # reversed rounds cancel linear drift
        for method in order:
            _run_method(model, method, rnd, s, adapters, prompts, result, out, t_start, fingerprint)
    result["environment"]["wall_s"] = round(time.monotonic() - t_start, 1)
    if s.rounds > 1:
        result["summary"] = bench_output.summarize_rounds(result["rows"])
    if out is not None:
        bench_output.write_tables(result, out)
        if s.plots:
            result["plots"] = [str(p) for p in bench_output.write_plots(result.get("summary") or result["rows"], out)]
    return result


def _run_method(model, method: str, rnd: int, s: BenchSettings, adapters: dict, prompts: dict, result: dict,
                out: Path | None, t_start: float, fingerprint: torch.Tensor) -> None:
    """Attach ``method``, measure its cases in every mode, detach; rows go to ``result["rows"]``."""
    env = result["environment"]
    attached = None
    try:
        attached = bench_models.attach_method(model, method, adapters, s.seed)
        attach_error = None
    except Exception as err:  # noqa: BLE001 - recorded in the rows, the run goes on
        attach_error = f"attach failed: {type(err).__name__}: {err}"
        log.warning("%s: %s", method, attach_error)
    for mode in s.modes:
        failed = attach_error
        if failed is None:
            try:
                enter_mode(model, mode, s)
            except Exception as err:  # noqa: BLE001
                failed = f"{mode} set-up failed: {type(err).__name__}: {err}"
        for (B, P), (ids, mask) in prompts.items():
            row = {"method": method, "mode": mode, "batch_size": B, "prompt_len": P, "new_tokens": s.new_tokens,
                   "round": rnd}
            if failed is not None:
                row["error"] = failed if failed.startswith(("attach", mode)) else f"skipped after: {failed}"
            elif s.time_budget_s is not None and time.monotonic() - t_start > s.time_budget_s:
                row["error"] = f"skipped: time budget of {s.time_budget_s:.0f} s used up"
            else:
                log.info("measuring %s / %s / B=%d P=%d (round %d)", method, mode, B, P, rnd)
                try:
                    is_base = bench_models.METHODS[method][0] is None
                    pair = attached.disabled if s.paired and mode == "eager" and not is_base else None
                    row.update(measure_case(model, ids, mask, mode, s, plain=s.check_harness and is_base, base_of=pair))
                    row.update(_switch_stats(model, ids, mask, mode, s))
                except Exception as err:  # noqa: BLE001 - compile failure, OOM, timeout...
                    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    failed = row["error"]
                    if ids.device.type == "cuda":
                        torch.cuda.empty_cache()
            result["rows"].append(row)
            bench_output.add_ratios(result["rows"])
            if out is not None:
                bench_output.write_tables(result, out)
    reset_compiled(model)
    if attached is not None:
        try:
            attached.detach()
        except Exception as err:  # noqa: BLE001 - a broken detach would poison later methods
            raise RuntimeError(f"could not remove the {method} adapter; stopping the benchmark") from err
    same = bool(torch.equal(weight_fingerprint(model), fingerprint))
    env["base_weights_unchanged"][method] = env["base_weights_unchanged"].get(method, True) and same
    if not same:
        log.error("%s changed the base weights: later methods run on modified weights", method)
