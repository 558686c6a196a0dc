"""CPU measurements of one concurrent training step (saved activations, aten ops, time) for N jobs.

    python experiments/2026-12-02_concurrent_training/measure.py --jobs 1,2,4,8 [--triton]

``saved_bytes`` and ``fwd_saved_bytes`` come from ``bench.step_profile``: the first counts every
storage packed by autograd during forward AND backward, so a form that recomputes in backward
(``_MixRecompute``) is charged its transient backward tensors too; the second only what the
forward leaves saved for backward (what is alive when backward starts: the activation peak).
"""
import argparse
import json
import time

import torch

from moelora.bench import concurrent_training as bench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", default="1,2,4,8")
    p.add_argument("--model", default="tiny_shape")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--triton", action="store_true", help="the GPU forms through Triton's interpreter")
    p.add_argument("--pad", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    s = bench.Settings(model=a.model, device=a.device, rows=a.rows, seq=a.seq, dtype=a.dtype)
    if a.pad is not None:
        s.pad_multiple = a.pad
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    model = bench.build_base(s, device, getattr(torch, a.dtype)).requires_grad_(False)
    pad_id = 0
    ns = [int(x) for x in a.jobs.split(",")]
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 2) for j in range(max(ns))}
    import contextlib
    import moelora
    ctx = moelora.kernel_backend("triton") if a.triton else contextlib.nullcontext()
    out = []
    with ctx:
        solo = {j: bench.step_profile(model, s, [j], batches, pad_id) for j in range(max(ns))}
        for n in ns:
            r = bench.step_profile(model, s, list(range(n)), batches, pad_id)
            alone = sum(solo[j]["saved_bytes"] for j in range(n))
            fwd_alone = sum(solo[j]["fwd_saved_bytes"] for j in range(n))
            r.update(n_jobs=n, solo_sum_saved_bytes=alone, ratio_vs_solo_sum=round(r["saved_bytes"] / alone, 3),
                     solo_sum_fwd_saved_bytes=fwd_alone,
                     fwd_ratio_vs_solo_sum=round(r["fwd_saved_bytes"] / fwd_alone, 3),
                     solo_sum_ops=sum(solo[j]["aten_ops"] for j in range(n)))
            out.append(r)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
