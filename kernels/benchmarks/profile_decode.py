"""Where the decode time goes: torch.profiler over one generate per method, after a warm-up.

    python kernels/benchmarks/profile_decode.py --methods base,mixlora --mode static --new-tokens 16 --out DIR
    python kernels/benchmarks/profile_decode.py --model tiny_shape --methods mixlora --mode eager --out DIR  # CPU smoke

Per method and mode it writes ``profile_<method>_<mode>.txt`` (the top ops by GPU time and by
host time) and one ``profile_summary.json`` row: wall ms/token of the profiled generate, GPU
kernel ms/token (the sum of kernel times: the time the GPU was busy), kernels per token, and the
gap between the two, which is host overhead (launches, Python) that the GPU waits for.
The benchmark numbers come from ``moelora.bench``; this tool explains them.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # moelora_kernels without install


def main(argv=None) -> list[dict]:
    from moelora.bench import models as bench_models
    from moelora.bench import output as bench_output
    from moelora.bench.jsonio import write_json
    from moelora.bench.latency import enter_mode, measure_case, prompts_for, reset_compiled, timed_generate
    from moelora.bench.settings import BenchSettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2_7b_shape", choices=sorted(bench_models.MODEL_SHAPES))
    p.add_argument("--methods", default="base,mixlora,lora_switch_unmerged")
    p.add_argument("--mode", default="static", choices=["eager", "static", "compile"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--top", type=int, default=30, help="rows per table")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = BenchSettings(model=a.model, methods=tuple(a.methods.split(",")), batch_sizes=(a.batch_size,),
                      prompt_lens=(a.prompt_len,), new_tokens=a.new_tokens, modes=(a.mode,), repeats=1,
                      warmup=1, plots=False).validate()
    device = bench_models.resolve_device(s.device)
    dtype = bench_models.resolve_dtype(s.dtype, device)
    model = bench_models.build_bench_model(s.model, device, dtype, s.seed)
    adapters = s.adapter_configs()
    (ids, mask), = prompts_for(s, model.config.vocab_size, device).values()
    env = bench_output.environment(model, device, "python kernels/benchmarks/profile_decode.py " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    rows = []
    cuda = device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    for method in s.methods:
        detach = bench_models.attach_method(model, method, adapters, s.seed).detach
        try:
            enter_mode(model, a.mode, s)
            measure_case(model, ids, mask, a.mode, s)  # warm-up: compiles and CUDA graphs happen here
            deadline = time.monotonic() + 600
            wall1, _ = timed_generate(model, ids, mask, 1, a.mode, deadline)
            with torch.profiler.profile(activities=acts) as prof:
                walln, steps = timed_generate(model, ids, mask, a.new_tokens + 1, a.mode, deadline)
            ev = prof.key_averages()
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            text = [f"{method} / {a.mode} / batch {a.batch_size}: {a.new_tokens + 1} new tokens, wall {walln:.1f} ms"
                    f" (prefill-only generate {wall1:.1f} ms)", "", "== by GPU time ==" if cuda else "== by CPU time ==",
                    ev.table(sort_by=key, row_limit=a.top, max_name_column_width=90)]
            if cuda:
                text += ["", "== by host time ==", ev.table(sort_by="self_cpu_time_total", row_limit=a.top,
                                                             max_name_column_width=90)]
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            n = a.new_tokens
            row = {"method": method, "mode": a.mode, "batch_size": a.batch_size,
                   "wall_ms_per_token": (walln - wall1) / n,
                   "step_ms_p50": sorted(steps)[len(steps) // 2] if steps else None,
                   "gpu_kernels_per_token": len(kernels) / (n + 1),
                   "gpu_busy_ms_per_token": sum(e.device_time for e in kernels) / 1e3 / (n + 1)}
            rows.append(row)
            (out / f"profile_{method}_{a.mode}.txt").write_text("\n".join(text) + "\n")
            print(json.dumps(row), flush=True)
        finally:
            reset_compiled(model)
            detach()
    write_json(out / "profile_summary.json", {"environment": env, "rows": rows}, indent=1)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
