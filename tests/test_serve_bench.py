"""python -m moelora.bench.serve in its CPU smoke mode: every system runs S-LoRA's workload on the
tiny model and writes its files; the engine rows generate exactly the trace's output tokens, stay
within the slot pool, and count their swaps; a spent time budget skips runs instead of running them."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from moelora.bench import serve as bench


def test_smoke_run_writes_results(tmp_path):
    pytest.importorskip("peft")
    res = bench.main(["--device", "cpu", "--model", "tiny", "--smoke", "--out", str(tmp_path)])
    a = bench.parse_args(["--smoke"])
    rows = {(r["system"], r["num_adapters"]): r for r in res["rows"]}
    assert set(rows) == {("base", 0)} | {(s, n) for s in ("moelora", "peft_swap", "peft_batched") for n in a.num_adapters}
    for (system, n), r in rows.items():
        trace = bench.make_workload(max(n, a.num_adapters[0]), a.alpha[0], a.rates[0], a.num_requests, a.prompt_len,
                                    a.output_len, a.arrival, a.cv, 61, a.seed + 7)
        assert r["status"] == "ok" and r["completed"] == a.num_requests, r
        assert r["output_tokens"] == sum(q.out_len for q in trace), (system, n)  # exact lengths, no EOS
        assert r["output_tok_s"] > 0
    for n in a.num_adapters:
        m = rows[("moelora", n)]
        used = len({q.adapter for q in bench.make_workload(n, a.alpha[0], a.rates[0], a.num_requests, a.prompt_len,
                                                            a.output_len, a.arrival, a.cv, 61, a.seed + 7)})
        # at most max_resident of them were resident when the run began (warm-up): the rest came in by swaps
        assert m["swaps"] >= used - a.max_resident and m["peak_resident_slots"] <= a.max_resident
        assert m["ttft_p50_ms"] > 0 and m["itl_p50_ms"] > 0
        st = m["step_times"]  # where the step's time went (what the GPU run's ITL is read against)
        assert st["steps_timed"] > 0 and st["launch_ms_p50"] > 0 and st["between_ms_p50"] is not None
        assert st["launch_ms_p50"] + st["sync_ms_p50"] <= 1e3 * m["wall_s"]
        fit = st["launch_ms_fit"]  # launch ms against tokens per step: the line through the run's steps
        assert fit["steps"] == st["steps_timed"] and fit["ms_per_1k_tokens"] == m["step_ms_per_1k_tokens"]
        steps = res["latency_samples"][f"moelora|{n}|{a.alpha[0]}|{a.rates[0]}"]["steps"]
        assert 0 < len(steps) <= st["steps_timed"] and all(x["tokens"] >= x["requests"] >= 1 for x in steps)
        assert [x["t_s"] for x in steps] == sorted(x["t_s"] for x in steps) and steps[0]["t_s"] >= 0
        assert sum(x["launch_ms"] for x in steps) <= 1e3 * st["launch_s_sum"] + 1
    big = max(a.num_adapters)
    assert used > a.max_resident and rows[("moelora", big)]["swaps"] >= 1  # the pool really swapped
    assert rows[("peft_swap", big)]["swaps"] >= 1
    assert rows[("base", 0)]["swaps"] == 0
    saved = json.loads((tmp_path / "serve_bench.json").read_text())
    assert saved["environment"]["attn_implementation"] and saved["environment"]["transformers"]
    assert "moelora.bench.serve" in saved["environment"]["command"] and saved["complete"] is True
    with open(tmp_path / "serve_bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(res["rows"])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "step_timeline.png").stat().st_size > 0


def test_time_budget_skips_runs(tmp_path):
    res = bench.main(["--device", "cpu", "--model", "tiny", "--smoke", "--systems", "base,moelora",
                      "--time-budget", "0", "--out", str(tmp_path)])
    assert res["rows"] and all(r["status"] == "skipped" for r in res["rows"])


def test_workload_shape():
    reqs = bench.make_workload(100, 1.0, 4.0, 400, (8, 16), (3, 5), "gamma", 2.0, 50, 0)
    assert all(8 <= len(r.prompt) <= 16 and 3 <= r.out_len <= 5 and 0 <= r.adapter < 100 for r in reqs)
    assert [r.arrival for r in reqs] == sorted(r.arrival for r in reqs)
    counts = [sum(r.adapter == i for r in reqs) for i in range(3)]
    assert counts[0] > counts[1] > counts[2]  # Zipf: the most popular adapters first
    assert 400 / reqs[-1].arrival == pytest.approx(4.0, rel=0.35)  # the mean rate
    classes = bench.adapter_classes([8, 16], 8, 0.25, 4, 2, mixlora_rank=4)
    assert [c["r"] for c in classes] == [8, 16, 8, 4, 8, 16, 8, 4]  # every 4th MixLoRA, at its own rank
    assert sum(c["method"] == "mixlora" for c in classes) == 2 and all(c["r"] == 4 for c in classes if c["method"] == "mixlora")


def test_step_launch_fit_is_the_least_squares_line():
    from moelora.serve._cb_private import _line_fit

    assert _line_fit([10, 20, 30], [3.0, 5.0, 7.0]) == {"ms_at_0": 1.0, "ms_per_1k_tokens": 200.0, "steps": 3}
    assert _line_fit([5, 5], [1.0, 2.0]) is None and _line_fit([1], [1.0]) is None


def test_part_limits_admit_every_adapter_added_after_the_engine_starts(monkeypatch):
    """The benchmarks add their adapters after the engine's CUDA memory plan is made
    (``Engine._plan_memory``, run here with the device's memory faked). Knowing no adapter, the plan
    bounds a stack position by the pool over its slots, and refuses a MixLoRA adapter whose experts
    are larger (the profile script's GPU run, 2026-12-08); with ``part_limits_gb`` of the banks it
    admits every one of them."""
    import json

    import moelora
    from moelora.bench.models import build_shape_model
    from moelora.serve import Engine
    from moelora.serve.registry import split_bytes

    # adapters of several MiB, so that the limits' GiB rounding (3 decimals) is not what admits them
    model, _ = build_shape_model("smollm2_135m_shape", "float32", "cpu", 0, num_hidden_layers=1)
    classes = bench.adapter_classes([4, 8], 4, 0.5, 8, 2, mixlora_rank=64)
    banks = bench.weight_banks(model, classes, 1, False, 0)
    parts = [split_bytes(b[0]) for b in banks.values()]
    biggest = max(sum(p) for p in parts)
    assert max(p[1] for p in parts) > 4 * 2**20
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (6 * 2**30, 8 * 2**30))
    slots = 4
    eng = Engine(model, max_new_tokens=2, eos_token_id=-1, max_resident_adapters=slots,
                 adapter_memory_gb=2 * biggest / 2**30)
    try:
        assert eng.registry.memory_bytes // slots < max(p[1] for p in parts)  # the case: experts above pool / slots
        eng._plan_memory(256, 16, None, None, None)  # at start, no adapter known
        names = [f"a{i}" for i in range(len(classes))]
        for name, d in zip(names, classes):
            eng.add_adapter_tensors(name, moelora.config_from_dict(d), banks[json.dumps(d, sort_keys=True)][0])
        mix = [n for n, d in zip(names, classes) if d["method"] == "mixlora"]
        with pytest.raises(Exception, match="max_expert_gb"):
            eng.generate([5, 6, 7], mix[0])
        lora_gb, expert_gb = bench.part_limits_gb(banks)
        eng._plan_memory(256, 16, lora_gb, None, None, expert_gb)
        assert mix and all(len(eng.generate([5, 6, 7], n)) == 2 for n in names)
    finally:
        eng.close()
