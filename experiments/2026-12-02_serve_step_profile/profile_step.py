"""Host ops of one packed serving step: base vs mixed adapters (issue 16), on CPU or CUDA.

Builds the engine the way ``moelora.bench.serve`` does (shape model with random weights,
synthetic adapters from ``adapter_classes`` / ``weight_banks``, ``Engine.add_adapter_tensors``),
then runs a handful of concurrent requests twice per system:
- a timing pass: wall time of every packed forward (the model call inside CB's step);
- a counting pass: every aten op of every packed forward through a ``TorchDispatchMode``
  (after autograd, i.e. what the dispatcher runs: one host launch each on a GPU), attributed to
  the innermost adapted module running (AdaptedLinear / AdaptedFFN own ops) or to the rest.

    python experiments/2026-12-02_serve_step_profile/profile_step.py --out experiments/2026-12-02_serve_step_profile/before.json

Greedy decoding: the two passes run the same steps; the tokens are printed as a checksum.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moelora
from moelora.bench.models import build_shape_model
from moelora.bench.serve import adapter_classes, part_limits_gb, weight_banks


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()
        self.by_site = collections.Counter()  # site kind -> ops
        self.stack: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        self.by_site[self.stack[-1] if self.stack else "other"] += 1
        return func(*args, **(kwargs or {}))


class SiteTimer:
    """Host seconds inside each kind of adapted module, exclusive of nested adapted modules."""

    def __init__(self) -> None:
        self.total = collections.Counter()
        self.stack: list = []  # [kind, start, child seconds]

    def enter(self, kind: str) -> None:
        self.stack.append([kind, time.perf_counter(), 0.0])

    def leave(self) -> None:
        kind, t0, child = self.stack.pop()
        dt = time.perf_counter() - t0
        self.total[kind] += dt - child
        if self.stack:
            self.stack[-1][2] += dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m_shape")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--num-adapters", type=int, default=40)
    ap.add_argument("--mixlora-share", type=float, default=0.25)
    ap.add_argument("--max-resident", type=int, default=32)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--mixlora-requests", type=int, default=2, help="requests of the mixed run on MixLoRA adapters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kernel-backend", default="auto",
                    help="auto | triton | torch (moelora.kernel_backend; triton on CPU needs TRITON_INTERPRET=1: "
                         "the GPU path's op counts on the CPU)")
    ap.add_argument("--site-times", action="store_true", help="host time inside adapted modules per step")
    ap.add_argument("--trace", default=None, help="folder for torch.profiler tables of the decode steps")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    with moelora.kernel_backend(a.kernel_backend):
        return _run(a)


def _run(a) -> dict:
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _ = build_shape_model(a.model, a.dtype, a.device, 0, num_hidden_layers=a.layers)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    classes = adapter_classes([8, 16, 32, 64], a.num_adapters, a.mixlora_share, 8, 2, 16)
    banks = weight_banks(model, classes, 2, False, 0)
    from moelora.layers.adapted import AdaptedFFN, AdaptedLinear
    from moelora.serve import Engine

    # the adapters are added after the engine starts: its memory plan needs their largest parts
    max_adapter_gb, max_expert_gb = part_limits_gb(banks)
    engine = Engine(model, max_pending=64, max_new_tokens=a.new_tokens, context_len=256,
                    max_resident_adapters=a.max_resident, max_adapter_gb=max_adapter_gb,
                    max_expert_gb=max_expert_gb)
    for i, d in enumerate(classes):
        engine.add_adapter_tensors(f"a{i}", moelora.config_from_dict(d), banks[json.dumps(d, sort_keys=True)][i % 2])

    rec: dict = {"on": None, "steps": [], "plan": None}  # plan: the forward's, read by the first adapted module
    fwd = model.forward
    local = threading.local()

    def wrapped(*args, **kw):
        mode = rec["on"]
        rec["plan"] = None
        ids = kw.get("input_ids")
        ntok = int(ids.numel()) if ids is not None else None
        if mode == "count":
            c = Counter()
            local.c = c
            with c:
                out = fwd(*args, **kw)
            local.c = None
            plan = rec["plan"]
            rec["steps"].append(dict(tokens=ntok, mixed=bool(getattr(plan, "mixed", False)),
                                     slots=len(getattr(plan, "slot_names", ()) or ()),
                                     ops=sum(c.ops.values()), by_site=dict(c.by_site), names=dict(c.ops)))
            return out
        timer = SiteTimer() if (mode == "time" and a.site_times) else None
        local.t = timer
        sync()
        t0 = time.perf_counter()
        out = fwd(*args, **kw)
        host = time.perf_counter() - t0
        sync()
        wall = time.perf_counter() - t0
        local.t = None
        plan = rec["plan"]
        if mode == "time":
            row = dict(tokens=ntok, mixed=bool(getattr(plan, "mixed", False)), ms=1e3 * wall, host_ms=1e3 * host)
            if timer is not None:
                row["site_ms"] = {k: 1e3 * v for k, v in timer.total.items()}
            rec["steps"].append(row)
        return out

    model.forward = wrapped

    def push(kind):
        def pre(mod, args):
            if rec["plan"] is None:
                rec["plan"] = mod._state.plan
            c = getattr(local, "c", None)
            if c is not None:
                c.stack.append(kind)
            t = getattr(local, "t", None)
            if t is not None:
                t.enter(kind)

        def post(mod, args, out):
            c = getattr(local, "c", None)
            if c is not None:
                c.stack.pop()
            t = getattr(local, "t", None)
            if t is not None:
                t.leave()
        return pre, post

    def hook_sites():
        for m in model.modules():
            if isinstance(m, (AdaptedLinear, AdaptedFFN)) and not getattr(m, "_prof_hooked", False):
                pre, post = push("linear" if isinstance(m, AdaptedLinear) else "ffn")
                m.register_forward_pre_hook(pre)
                m.register_forward_hook(post)
                m._prof_hooked = True

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 4000, (a.prompt_len + 3 * i,), generator=gen).tolist() for i in range(a.requests)]
    # adapters of the mixed run: every 4th adapter is MixLoRA (adapter_classes), take 2 of those + LoRA of all ranks
    mix = [i for i, d in enumerate(classes) if d["method"] == "mixlora"]
    lora = [i for i, d in enumerate(classes) if d["method"] == "lora"]
    picks = ([f"a{i}" for i in mix[: a.mixlora_requests]] + [f"a{i}" for i in lora])[: a.requests]

    def batch(adapters):
        rids = [engine.submit(p, adapter=ad, max_new_tokens=a.new_tokens) for p, ad in zip(prompts, adapters)]
        return [list(engine.stream(r)) for r in rids]

    # warm-up: make every adapter of the mixed run resident (and the rest of the slots filled)
    for i in range(0, a.num_adapters, 8):
        batch([f"a{j}" for j in range(i, min(i + 8, a.num_adapters))][: a.requests])
    batch(picks)
    hook_sites()
    result = {"settings": vars(a), "torch": torch.__version__, "systems": {},
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for system, adapters in (("base", [None] * a.requests), ("moelora", picks)):
        rows = {}
        toks = None
        for mode in ("time", "count"):
            rec["on"], rec["steps"] = mode, []
            got = batch(adapters)
            rec["on"] = None
            toks = got if toks is None else toks
            assert got == toks, "the counting pass generated other tokens"
            rows[mode] = rec["steps"]
        if a.trace:
            import os

            from torch.profiler import ProfilerActivity, profile
            os.makedirs(a.trace, exist_ok=True)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            rec["on"] = "trace"
            with profile(activities=acts) as prof:
                got = batch(adapters)
            rec["on"] = None
            assert got == toks, "the traced pass generated other tokens"
            ka = prof.key_averages()
            with open(os.path.join(a.trace, f"trace_{system}.txt"), "w") as f:
                f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
                if cuda:
                    f.write("\n\n" + ka.table(sort_by="self_cuda_time_total", row_limit=25))
        tim, cnt = rows["time"], rows["count"]
        decode_t = [s for s in tim if s["tokens"] == a.requests]
        decode_c = [s for s in cnt if s["tokens"] == a.requests]
        first_c = cnt[0]
        names = collections.Counter()
        for s in decode_c:
            names.update(s["names"])
        n_lin = sum(isinstance(m, AdaptedLinear) for m in model.modules())
        n_ffn = sum(isinstance(m, AdaptedFFN) for m in model.modules())
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        summ = dict(
            steps=len(cnt), decode_steps=len(decode_c),
            # the packed prefill: its wall and host ms (and host ms inside the adapted modules) say
            # whether a long prefill step's extra is host launches or device time
            first_step=dict(tokens=first_c["tokens"], ops=first_c["ops"], by_site=first_c["by_site"],
                            ms=tim[0]["ms"], host_ms=round(tim[0]["host_ms"], 2), slots=first_c["slots"],
                            site_ms=({k: round(v, 2) for k, v in tim[0]["site_ms"].items()}
                                     if "site_ms" in tim[0] else None)),
            decode=dict(tokens=a.requests, ops_p50=med([s["ops"] for s in decode_c]),
                        ms_p50=round(med([s["ms"] for s in decode_t]), 2),
                        host_ms_p50=round(med([s["host_ms"] for s in decode_t]), 2),
                        site_ms_p50=({k: round(med([s["site_ms"].get(k, 0.0) for s in decode_t]), 2)
                                      for k in ("linear", "ffn")} if a.site_times else None),
                        slots=decode_c[0]["slots"] if decode_c else None,
                        ops_per_linear=round(med([s["by_site"].get("linear", 0) for s in decode_c]) / n_lin, 1),
                        ops_per_ffn_own=round(med([s["by_site"].get("ffn", 0) for s in decode_c]) / max(n_ffn, 1), 1),
                        ops_other=med([s["by_site"].get("other", 0) for s in decode_c]),
                        top_ops=[(k, round(v / len(decode_c), 1)) for k, v in names.most_common(15)]),
            adapted_linears=n_lin, adapted_ffns=n_ffn, checksum=sum(sum(t) for t in toks))
        result["systems"][system] = summ
        print(system, json.dumps(summ, indent=1), flush=True)
    engine.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
