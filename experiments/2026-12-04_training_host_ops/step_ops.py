"""aten ops of one training step (forward, backward; the optimizer apart), counted on the CPU.

    python experiments/2026-12-04_training_host_ops/step_ops.py --out ops.json
    TRITON_INTERPRET=1 python experiments/2026-12-04_training_host_ops/step_ops.py --triton --out ops_triton.json

Why ops: on the H200 an eager training step of the Llama-2-7B shape is host-bound (a LoRA step of
4x1024 tokens, 335 ms, is ~16k aten ops at ~20 us each), and the op count of a step does not
depend on the device or the width, so a 32-layer model of the 7B layout at width 128 counts
them. The base is bf16 (fp16 with ``--triton``: the interpreter's bf16 arithmetic is broken) with
fp32 adapter weights under autocast, as bf16-mixed training runs on the GPU. With ``--triton``
the MixLoRA paths take the Triton kernels (as on CUDA) and each kernel launch counts as one op
(the interpreter's own tensor ops inside a launch are not counted). CPU-only checks (``one_hot``'s
and the kernels' range checks: ``aminmax``/``min``/``max`` + ``.item()``) are counted and listed
separately (``cpu_only``): CUDA skips them.

Cases: ``lora`` (one LoRA r16 job, 7 linears), ``mixlora`` (one MixLoRA job: 8 experts top-2 r8,
attention LoRA; the benchmark's job 1), ``concurrent_N`` (N jobs of ``moelora.bench.concurrent_training``,
alternating LoRA and MixLoRA, one packed step). Jobs' dropout streams are seeded, as training seeds them.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moelora
from moelora.bench import concurrent_training as bench
from moelora.bench.models import build_shape_model
from moelora.training.packing import pack_micro_batches, per_job_losses

CPU_ONLY = {"aminmax", "min", "max", "_local_scalar_dense"}


class _Launches:
    """Counts Triton interpreter launches (one op each) and hides the tensor ops they run."""

    def __init__(self) -> None:
        self.depth, self.counter = 0, None
        import triton.runtime.interpreter as interp

        orig = interp.GridExecutor.__call__
        launches = self

        def call(ex, *a, **k):
            if launches.counter is not None and not launches.depth:
                launches.counter.add("triton_launch")
            launches.depth += 1
            try:
                return orig(ex, *a, **k)
            finally:
                launches.depth -= 1

        interp.GridExecutor.__call__ = call


class _Count(TorchDispatchMode):
    def __init__(self, launches: _Launches | None) -> None:
        super().__init__()
        self.phase, self.by = "forward", collections.Counter()
        self.launches = launches
        if launches is not None:
            launches.counter = self

    def add(self, name: str) -> None:
        self.by[(self.phase, name)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.launches is None or not self.launches.depth:
            self.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_case(model, s, jobs: list[int], batches, dtype, launches) -> dict:
    names, optims = bench._attach(model, s, jobs)
    model.train()

    def step(counter=None):
        packed = pack_micro_batches([batches[j][0] for j in jobs], [names[j] for j in jobs], 0, torch.device("cpu"),
                                    pad_to_multiple_of=s.pad_multiple or None)
        with torch.autocast("cpu", dtype=dtype):
            out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                        adapter_names=packed.adapter_names)
        losses = per_job_losses(out.logits, packed)
        aux = getattr(out, "aux_losses", None) or {}
        total = sum(l + aux[names[j]].to(l.dtype) if names[j] in aux else l for j, l in zip(jobs, losses))
        if counter is not None:
            counter.phase = "backward"
        total.backward()
        if counter is not None:
            counter.phase = "optimizer"
        for j in jobs:
            opt, params = optims[j]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    try:
        step()  # the optimizers' state, first-time caches
        counter = _Count(launches)
        with counter:
            step(counter)
    finally:
        if launches is not None:
            launches.counter = None
        bench._detach(model, names)
    fwd = sum(v for (p, _), v in counter.by.items() if p == "forward")
    bwd = sum(v for (p, _), v in counter.by.items() if p == "backward")
    cpu_only = sum(v for (p, n), v in counter.by.items() if p != "optimizer" and n in CPU_ONLY)
    top = collections.Counter()
    for (p, n), v in counter.by.items():
        if p != "optimizer":
            top[n] += v
    return {"forward": fwd, "backward": bwd, "forward_backward": fwd + bwd, "cpu_only": cpu_only,
            "forward_backward_on_cuda": fwd + bwd - cpu_only, "top_ops": dict(top.most_common(15))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="lora,mixlora,concurrent_2,concurrent_8,concurrent_16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--triton", action="store_true", help="the Triton kernels through the interpreter (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    dtype = torch.float16 if a.triton else torch.bfloat16
    ctx = contextlib.ExitStack()
    launches = None
    if a.triton:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--triton needs TRITON_INTERPRET=1 in the environment")
        ctx.enter_context(moelora.kernel_backend("triton"))
        launches = _Launches()
    s = bench.Settings(model="llama2_7b_shape", device="cpu", rows=2, seq=32, dtype="float32", optimizer="foreach")
    model = build_shape_model("llama2_7b_shape", str(dtype).removeprefix("torch."), "cpu", 0, hidden_size=128,
                              intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                              num_hidden_layers=a.layers)[0].requires_grad_(False)
    cases = a.cases.split(",")
    n_max = max([int(c.split("_")[1]) for c in cases if c.startswith("concurrent_")] + [2])
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 2) for j in range(n_max)}
    rows = {}
    with ctx:
        for case in cases:
            jobs = {"lora": [0], "mixlora": [1]}.get(case) or list(range(int(case.split("_")[1])))
            rows[case] = count_case(model, s, jobs, batches, dtype, launches)
            print(case, {k: v for k, v in rows[case].items() if k != "top_ops"}, flush=True)
    from moelora.bench.versions import record_versions

    result = {"what": "aten ops per training step (forward + backward), 7B layout at width 128",
              "layers": a.layers, "triton": a.triton, "autocast": str(dtype), "cases": rows,
              "versions": record_versions(), "machine": platform.processor() or platform.machine()}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
