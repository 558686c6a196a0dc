"""Latency benchmark: CPU smoke run, failure handling, the Hydra and argparse entries."""
from __future__ import annotations

import csv
import json
import math
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import moelora
from moelora.eval import bench_models, bench_output, latency
from moelora.eval.latency import BenchSettings, run_benchmark

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = ("base", "lora", "mixlora", "lora_switch_merge", "lora_switch_unmerged", "reference_mixlora")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two spinning intra-op threads make tiny models crawl
    yield
    torch.set_num_threads(n)


def _small(**kw) -> BenchSettings:
    base = dict(model="tiny_shape", methods=("base", "mixlora"), batch_sizes=(1,), prompt_lens=(6,), new_tokens=3,
                modes=("eager",), repeats=1, warmup=0, r=4, num_experts=4, plots=False)
    return BenchSettings(**{**base, **kw})


def test_bench_smoke_on_cpu_writes_sane_files(tmp_path):
    s = _small(model="tiny", methods=ALL_METHODS, batch_sizes=(1, 2), modes=("eager", "static"), repeats=2,
               warmup=1, out_dir=str(tmp_path), plots=True, command="pytest smoke")
    result = run_benchmark(s)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"bench.json", "bench.csv", "latency_vs_batch.png", "ratio_to_base.png"} <= files
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(ALL_METHODS) * 2 * 2
    env = data["environment"]
    assert env["command"] == "pytest smoke" and env["torch"] and env["transformers"] and "device" in env
    assert all(env["base_weights_unchanged"].values()) and len(env["base_weights_unchanged"]) == len(ALL_METHODS)
    ref_missing = "mixlora" not in sys.modules and __import__("importlib").util.find_spec("mixlora") is None
    assert ref_missing or env["mixlora"]  # the reference has no __version__: read from its distribution
    for row in data["rows"]:
        if row["method"] == "reference_mixlora" and ref_missing:
            assert row["error"].startswith("attach failed")
            continue
        assert not row.get("error"), row
        for key in ("prefill_ms", "decode_ms_per_token", "step_ms_p50", "step_ms_p90", "decode_tokens_per_s",
                    "peak_mem_mb", "decode_ratio", "decode_ratio_vs_base_eager"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["step_ms_p50"] <= row["step_ms_p90"]
        assert row["total_ms"] > row["prefill_ms"]
        if row["method"] == "base":
            assert row["decode_ratio"] == pytest.approx(1.0)
    with (tmp_path / "bench.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    assert result["rows"] == data["rows"]


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real_attach, real_enter = bench_models.attach_method, latency._enter_mode

    def attach(model, method, *a, **k):
        if method == "lora":
            raise RuntimeError("no adapter today")
        return real_attach(model, method, *a, **k)

    def enter(model, mode, s):
        if mode == "compile":
            raise RuntimeError("inductor exploded")
        return real_enter(model, mode, s)

    monkeypatch.setattr(bench_models, "attach_method", attach)
    monkeypatch.setattr(latency, "_enter_mode", enter)
    rows = run_benchmark(_small(methods=("base", "lora", "mixlora"), modes=("eager", "compile"),
                                out_dir=str(tmp_path)))["rows"]
    by = {(r["method"], r["mode"]): r for r in rows}
    assert by[("lora", "eager")]["error"] == "attach failed: RuntimeError: no adapter today"
    assert "inductor exploded" in by[("mixlora", "compile")]["error"]
    assert by[("mixlora", "eager")]["decode_ms_per_token"] > 0 and not by[("mixlora", "eager")].get("error")
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][-1]["method"] == "mixlora"


def test_case_timeout_and_time_budget():
    rows = run_benchmark(_small(batch_sizes=(1, 2), case_timeout_s=0.0))["rows"]
    assert rows[0]["error"].startswith("CaseTimeout") and rows[1]["error"].startswith("skipped after: CaseTimeout")
    rows = run_benchmark(_small(time_budget_s=0.0))["rows"]
    assert all(r["error"].startswith("skipped: time budget") for r in rows)


def test_random_shape_model_and_adapters_are_not_zero_and_route_heterogeneously():
    model, tok = bench_models.build_shape_model("tiny_shape", dtype="float32", device="cpu")
    assert tok is None
    w = model.model.layers[0].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025 and torch.all(model.model.norm.weight == 1)
    detach = bench_models.attach_method(model, "mixlora", bench_models.default_adapter_configs(r=4, num_experts=4)).detach
    b = model.model.layers[0].mlp.experts["down_proj"].lora_B
    assert b.abs().min() > 0
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    experts, _, _ = moelora.routing_records(model)[0]
    assert len({tuple(sorted(e)) for e in experts.tolist()}) > 2  # many different expert pairs
    detach()
    assert moelora.get_adapter_config(model) is None


def test_hydra_config_builds_the_same_settings(tmp_path):
    from hydra import compose, initialize_config_dir

    from moelora.eval.cli import bench_settings_from_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=["model=llama2_7b_shape", "batch_sizes=[1,8,32]", "prompt_lens=[64]",
                                          "new_tokens=128", "adapters.mixlora.num_experts=4",
                                          f"paths.output_dir={tmp_path}"])
    s = bench_settings_from_config(cfg)
    assert s.batch_sizes == (1, 8, 32) and s.prompt_lens == (64,) and s.new_tokens == 128
    assert s.methods == ALL_METHODS and s.modes == ("eager", "static")
    assert s.adapters["mixlora"]["num_experts"] == 4 and s.adapters["lora"]["r"] == 16
    assert s.model["_target_"] == "moelora.eval.bench_models.build_shape_model"
    moelora.config_from_dict(s.adapters["lora_switch"])  # the training groups + bench sizes stay valid
    # the YAML shape is the Python one
    node = yaml.safe_load((REPO / "conf/model/llama2_7b_shape.yaml").read_text())
    assert {k: node[k] for k in bench_models.MODEL_SHAPES["llama2_7b_shape"]} == bench_models.MODEL_SHAPES["llama2_7b_shape"]
    # and a tiny composed run works end to end
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=["methods=[base,lora]", "modes=[eager]", "new_tokens=2", "repeats=1",
                                          "warmup=0", "plots=false", f"paths.output_dir={tmp_path}"])
    result = run_benchmark(bench_settings_from_config(cfg))
    assert [r["method"] for r in result["rows"]] == ["base", "lora"] and (tmp_path / "bench.csv").is_file()


def test_argparse_entry_runs_without_hydra_lm_eval_datasets(tmp_path):
    """The GPU machine has none of hydra/omegaconf/lm-eval/datasets: block them and run the CLI."""
    s = latency.parse_args(["--model", "llama2_7b_shape", "--methods", "base,lora,mixlora", "--batch-sizes", "1,8,32",
                            "--prompt-len", "64", "--new-tokens", "128", "--modes", "eager,static", "--out", "X"])
    assert (s.model, s.methods, s.batch_sizes, s.prompt_lens, s.out_dir) == (
        "llama2_7b_shape", ("base", "lora", "mixlora"), (1, 8, 32), (64,), "X")
    code = (
        "import sys, runpy\n"
        "for name in ('hydra', 'omegaconf', 'lm_eval', 'datasets'):\n"
        "    sys.modules[name] = None  # import -> ModuleNotFoundError, find_spec -> None: as if uninstalled\n"
        "sys.argv = ['latency.py', '--model', 'tiny_shape', '--methods', 'base,lora', '--batch-sizes', '1',\n"
        f"            '--prompt-len', '4', '--new-tokens', '2', '--repeats', '1', '--modes', 'eager', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_module('moelora.eval.latency', run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("files: ")  # the table is printed last
    assert "| lora | eager | 1 | 4 |" in proc.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["environment"]["command"].startswith("python -m moelora.eval.latency --model tiny_shape")


def test_rounds_alternate_the_order_and_the_summary_takes_per_round_medians(tmp_path):
    s = _small(methods=("base", "mixlora"), batch_sizes=(1, 2), rounds=3, repeats=2, out_dir=str(tmp_path))
    result = run_benchmark(s)
    rows = result["rows"]
    order = [(r["round"], r["method"]) for r in rows if r["batch_size"] == 1]
    assert order == [(0, "base"), (0, "mixlora"), (1, "mixlora"), (1, "base"), (2, "base"), (2, "mixlora")]
    for r in rows:  # each round's ratio is against that round's base
        b = next(x for x in rows if x["method"] == "base" and x["round"] == r["round"] and x["batch_size"] == r["batch_size"])
        assert r["decode_ratio"] == pytest.approx(r["decode_ms_per_token"] / b["decode_ms_per_token"])
        assert len(r["decode_ms_repeats"]) == 2 and min(r["decode_ms_repeats"]) <= r["decode_ms_per_token"]
    summary = {(r["method"], r["batch_size"]): r for r in result["summary"]}
    assert len(summary) == 4 and all(r["rounds"] == 3 for r in summary.values())
    mix = summary[("mixlora", 2)]
    ratios = sorted(r["decode_ratio"] for r in rows if r["method"] == "mixlora" and r["batch_size"] == 2)
    assert (mix["decode_ratio_min"], mix["decode_ratio"], mix["decode_ratio_max"]) == pytest.approx(tuple(ratios))
    times = sorted(r["decode_ms_per_token"] for r in rows if r["method"] == "mixlora" and r["batch_size"] == 2)
    assert mix["decode_ms_per_token"] == pytest.approx(times[1])
    with (tmp_path / "bench_summary.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and float(csv_rows[-1]["decode_ratio"]) == pytest.approx(mix["decode_ratio"])
    assert json.loads((tmp_path / "bench.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    table = bench_output.format_table(result)
    assert "medians over 3 rounds" in table and f"{mix['decode_ratio']:.2f} [{ratios[0]:.2f}-{ratios[2]:.2f}]" in table


def test_summary_of_failed_and_partial_rounds():
    rows = [{"method": "base", "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": 0,
             "decode_ms_per_token": 2.0},
            {"method": "base", "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": 1,
             "decode_ms_per_token": 4.0},
            {"method": "mixlora", "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": 0,
             "decode_ms_per_token": 3.0},
            {"method": "mixlora", "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": 1,
             "error": "CaseTimeout: slow"},
            {"method": "lora", "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": 0,
             "error": "attach failed: x"}]
    bench_output.add_ratios(rows)
    by = {r["method"]: r for r in bench_output.summarize_rounds(rows)}
    assert by["base"]["decode_ms_per_token"] == 3.0 and by["base"]["rounds"] == 2
    assert by["mixlora"]["rounds"] == 1 and by["mixlora"]["decode_ratio"] == pytest.approx(1.5)  # round 0's base
    assert by["lora"]["rounds"] == 0 and by["lora"]["error"] == "attach failed: x" and "decode_ratio" not in by["lora"]


def test_reference_speedup_and_the_harness_check(tmp_path):
    rows = run_benchmark(_small(methods=("base", "mixlora", "reference_mixlora"), repeats=2))["rows"]
    by = {r["method"]: r for r in rows}
    if by["reference_mixlora"].get("error"):
        pytest.skip("the reference mixlora package is not installed")
    ref = by["reference_mixlora"]["decode_ms_per_token"]
    for r in rows:
        assert r["reference_speedup"] == pytest.approx(ref / r["decode_ms_per_token"])
    # plain generate is timed for the base only, next to the timed runs
    assert by["base"]["hf_generate_ms_per_token"] > 0
    assert by["base"]["harness_ratio"] == pytest.approx(by["base"]["decode_ms_per_token"] / by["base"]["hf_generate_ms_per_token"])
    assert "hf_generate_ms_per_token" not in by["mixlora"]
    off = run_benchmark(_small(methods=("base",), check_harness=False))["rows"][0]
    assert "harness_ratio" not in off and off["decode_ms_per_token"] > 0


def test_bad_rounds_fail_clearly():
    with pytest.raises(ValueError, match="rounds"):
        _small(rounds=0).validate()
    s = latency.parse_args(["--rounds", "4", "--no-harness-check"])
    assert s.rounds == 4 and s.check_harness is False


def test_best_of_repeats_and_its_ratios():
    def row(method, rnd, times):
        return {"method": method, "mode": "eager", "batch_size": 1, "prompt_len": 4, "new_tokens": 2, "round": rnd,
                "decode_ms_per_token": sorted(times)[len(times) // 2], "decode_ms_best": min(times)}

    rows = [row("base", 0, [10, 20, 30]), row("mixlora", 0, [12, 40, 41]), row("reference_mixlora", 0, [70, 90, 99]),
            row("reference_mixlora", 1, [60, 95, 99]), row("mixlora", 1, [30, 33, 11]), row("base", 1, [25, 26, 27])]
    bench_output.add_ratios(rows)
    assert rows[1]["decode_ratio_best"] == pytest.approx(12 / 10) and rows[4]["decode_ratio_best"] == pytest.approx(11 / 25)
    assert rows[1]["reference_speedup_best"] == pytest.approx(70 / 12)
    by = {r["method"]: r for r in bench_output.summarize_rounds(rows)}
    assert by["mixlora"]["decode_ms_best"] == 11 and by["base"]["decode_ms_best"] == 10
    assert by["mixlora"]["decode_ratio_best"] == pytest.approx(1.1)  # best of all rounds over the base's best
    assert by["mixlora"]["reference_speedup_best"] == pytest.approx(60 / 11)
    assert by["mixlora"]["decode_ratio"] == pytest.approx(statistics.median([40 / 20, 30 / 26]))


@pytest.mark.parametrize("method", ["mixlora", "lora_switch_merge", "reference_mixlora"])
def test_disabled_runs_the_plain_base_and_puts_the_method_back(method):
    if method == "reference_mixlora":
        pytest.importorskip("mixlora")
    model, _ = bench_models.build_shape_model("tiny_shape", dtype="float32", device="cpu")
    ids = torch.randint(4, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        attached = bench_models.attach_method(model, method, bench_models.default_adapter_configs(r=4, num_experts=4))
        adapted = model(ids).logits
        assert not torch.allclose(adapted, base, atol=1e-4)
        with attached.disabled():
            torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-6, rtol=1e-6)
        attached.detach()
        torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)


def test_paired_rows_time_the_base_beside_every_repeat():
    rows = run_benchmark(_small(methods=("base", "mixlora"), modes=("eager", "static"), repeats=3))["rows"]
    by = {(r["method"], r["mode"]): r for r in rows}
    mix = by[("mixlora", "eager")]
    assert len(mix["paired_base_ms_repeats"]) == 3 and all(b > 0 for b in mix["paired_base_ms_repeats"])
    ratios = [m / b for m, b in zip(mix["decode_ms_repeats"], mix["paired_base_ms_repeats"])]
    assert mix["decode_ratio_paired"] == pytest.approx(statistics.median(ratios))
    assert "decode_ratio_paired" not in by[("base", "eager")]  # the base has no pair
    assert "decode_ratio_paired" not in by[("mixlora", "static")]  # swapping modules would recompile
    off = run_benchmark(_small(paired=False))["rows"]
    assert all("decode_ratio_paired" not in r for r in off)


def test_host_gpu_monitor_logs_until_terminated(tmp_path):
    """kernels/benchmarks/host_gpu_monitor.py: host.csv rows with unix times, clean exit on SIGTERM
    (gpu.csv only where nvidia-smi exists)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(REPO / "kernels/benchmarks/host_gpu_monitor.py"), "--out", str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            host = tmp_path / "host.csv"
            if host.exists() and len(host.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    rows = list(csv.DictReader((tmp_path / "host.csv").open()))
    assert len(rows) >= 2
    now = time.time()
    assert all(now - 120 < float(r["t"]) <= now and float(r["probe_ms"]) > 0 for r in rows)


def test_a_prefill_slower_than_the_long_run_is_flagged_not_hidden(monkeypatch):
    """Noise can make t(1 new) > t(N+1 new) in one repeat: that repeat's decode time is <= 0. It is
    counted and kept out of the paired ratio; the best-of uses the fastest runs of each length."""
    times = iter([50.0, 40.0,            # repeat 0: prefill-only 50 ms, long run 40 ms -> decode < 0
                  10.0, 70.0, 10.0, 40.0,  # its base pair (repeat 0: after), repeat 1's base pair (before)
                  12.0, 72.0,            # repeat 1
                  ])

    def fake_timed(model, ids, mask, n_new, mode, deadline, stamps=True):
        return next(times), []

    monkeypatch.setattr(latency, "_timed", fake_timed)
    s = _small(repeats=2, warmup=0, new_tokens=3)
    row = latency.measure_case(torch.nn.Linear(1, 1), torch.zeros(1, 2, dtype=torch.long), None, "eager", s,
                               base_of=__import__("contextlib").nullcontext)
    assert row["decode_ms_repeats"] == pytest.approx([-10 / 3, 20.0])
    assert row["paired_base_ms_repeats"] == pytest.approx([20.0, 10.0])
    assert row["nonpositive_repeats"] == 1
    assert row["decode_ratio_paired"] == pytest.approx(2.0)  # repeat 1 only
    assert row["decode_ms_best"] == pytest.approx((40.0 - 12.0) / 3)
    table = bench_output.format_table({"environment": {"device": "x", "torch": "t", "transformers": "t", "triton": "t",
                                                       "model_dtype": "f", "command": "c"},
                                       "rows": [{"method": "mixlora", "mode": "eager", "batch_size": 1, "prompt_len": 2,
                                                 **row}]})
    assert "noisy: 1 repeat(s) with decode <= 0" in table


def test_a_noisy_base_row_keeps_its_flag_beside_the_harness_check(monkeypatch):
    """Base rows also time plain generate (harness_ratio); that must not drop nonpositive_repeats."""
    times = iter([50.0, 40.0,  # timed repeat: decode < 0
                  10.0, 40.0])  # plain generate beside it

    monkeypatch.setattr(latency, "_timed", lambda *a, **k: (next(times), []))
    row = latency.measure_case(torch.nn.Linear(1, 1), torch.zeros(1, 2, dtype=torch.long), None, "eager",
                               _small(repeats=1, warmup=0, new_tokens=3), plain=True)
    assert row["nonpositive_repeats"] == 1
    assert row["hf_generate_ms_per_token"] == pytest.approx(10.0)
    assert row["harness_ratio"] == pytest.approx((-10 / 3) / 10.0)
