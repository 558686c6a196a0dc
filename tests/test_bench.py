"""Latency benchmark (moelora.bench): CPU smoke run, failure handling, the Hydra and argparse
entries, and its shared helpers (settings = Hydra schema, atomic JSON, versions, timing)."""
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
from moelora.bench import cli as bench_cli
from moelora.bench import latency
from moelora.bench import models as bench_models
from moelora.bench import output as bench_output
from moelora.bench.latency import run_benchmark
from moelora.bench.settings import BenchSettings

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
    real_attach, real_enter = bench_models.attach_method, latency.enter_mode

    def attach(model, method, *a, **k):
        if method == "lora":
            raise RuntimeError("no adapter today")
        return real_attach(model, method, *a, **k)

    def enter(model, mode, s):
        if mode == "compile":
            raise RuntimeError("inductor exploded")
        return real_enter(model, mode, s)

    monkeypatch.setattr(bench_models, "attach_method", attach)
    monkeypatch.setattr(latency, "enter_mode", enter)
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


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from moelora.bench.settings import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("bench", overrides=list(overrides))


def test_hydra_config_builds_the_same_settings(tmp_path):
    cfg = _compose(["model=llama2_7b_shape", "batch_sizes=[1,8,32]", "prompt_lens=[64]", "new_tokens=128",
                    "adapters.mixlora.num_experts=4", "adapters.lora_switch.switch_mode=merge",
                    f"paths.output_dir={tmp_path}"])
    s = bench_cli.settings_from_config(cfg)
    assert s.batch_sizes == (1, 8, 32) and s.prompt_lens == (64,) and s.new_tokens == 128
    assert s.methods == ALL_METHODS and s.modes == ("eager", "static") and s.out_dir == str(tmp_path)
    adapters = s.adapter_configs()
    assert adapters["mixlora"]["num_experts"] == 4 and adapters["lora_switch"]["num_experts"] == 8
    assert adapters["lora"]["r"] == 16 and adapters["lora_switch"]["switch_mode"] == "merge"
    assert s.model["_target_"] == "moelora.bench.models.build_shape_model"
    for family in ("lora", "mixlora", "lora_switch"):
        moelora.config_from_dict(adapters[family])  # the bench sizes and overrides stay valid configs
    # the YAML shape is the Python one
    node = yaml.safe_load((REPO / "conf/model/llama2_7b_shape.yaml").read_text())
    assert {k: node[k] for k in bench_models.MODEL_SHAPES["llama2_7b_shape"]} == bench_models.MODEL_SHAPES["llama2_7b_shape"]
    # and a tiny composed run works end to end, on the tiny_llama group's model
    cfg = _compose(["methods=[base,lora]", "modes=[eager]", "prompt_lens=[8]", "new_tokens=2", "repeats=1",
                    "warmup=0", "plots=false", f"paths.output_dir={tmp_path}"])
    result = run_benchmark(bench_cli.settings_from_config(cfg))
    assert [r["method"] for r in result["rows"]] == ["base", "lora"] and (tmp_path / "bench.csv").is_file()
    assert result["environment"]["model_config"]["hidden_size"] == 128  # conf/model/tiny_llama.yaml
    assert result["environment"]["model_config"]["num_hidden_layers"] == 2


def test_settings_dataclass_is_the_hydra_schema(tmp_path):
    """Every field of BenchSettings is a Hydra key with the dataclass default; bench.yaml restates none."""
    import dataclasses

    cfg = _compose([f"paths.output_dir={tmp_path}"])
    s = bench_cli.settings_from_config(cfg)
    defaults = BenchSettings()
    for f in dataclasses.fields(BenchSettings):
        if f.name not in ("model", "paths", "out_dir", "command"):  # the groups and the run directory
            assert getattr(s, f.name) == getattr(defaults.validate(), f.name), f.name
    bench_yaml = yaml.safe_load((REPO / "conf/bench.yaml").read_text())
    assert set(bench_yaml) == {"defaults"}, "conf/bench.yaml must only pick groups: fields live in BenchSettings"
    assert s.model["_target_"] == "moelora.training.tiny.tiny_llama" and s.task_name == "bench"
    # the argparse flags are the same fields with the same defaults
    assert bench_cli.parse_args([]) == BenchSettings()


def test_unknown_or_mistyped_bench_keys_fail_naming_the_key(tmp_path):
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    with pytest.raises(ConfigCompositionException, match="new_tokenz"):
        _compose(["new_tokenz=3"])
    with pytest.raises(ConfigCompositionException, match="new_tokens"):
        _compose(["new_tokens=many"])
    # "+key" gets past Hydra's schema check; the settings still refuse it, by name
    with pytest.raises(ValueError, match=r"unknown bench setting\(s\) \['new_tokenz'\]"):
        bench_cli.settings_from_config(_compose(["+new_tokenz=3", f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match=r"unknown adapter family \['mixlora2'\]"):
        bench_cli.settings_from_config(_compose(["+adapters.mixlora2.r=3", f"paths.output_dir={tmp_path}"]))
    # a config from elsewhere (e.g. an old run's .hydra/config.yaml) is checked the same way
    with pytest.raises(ValueError, match="warm_up"):
        bench_cli.settings_from_config(OmegaConf.create({"warm_up": 2, "new_tokens": 3}))
    with pytest.raises(TypeError, match="warm_up"):
        BenchSettings(warm_up=2)
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--warm-up", "2"])


def test_console_script_points_at_the_bench_package():
    import importlib
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = project["project"]["scripts"]["moelora-bench"]
    module, _, name = target.partition(":")
    assert module.startswith("moelora.bench") and callable(getattr(importlib.import_module(module), name))
    assert "moelora.bench" in project["tool"]["setuptools"]["packages"]


def test_argparse_entry_runs_without_hydra_lm_eval_datasets(tmp_path):
    """The GPU machine has none of hydra/omegaconf/lm-eval/datasets: block them and run the CLI."""
    s = bench_cli.parse_args(["--model", "llama2_7b_shape", "--methods", "base,lora,mixlora", "--batch-sizes", "1,8,32",
                            "--prompt-len", "64", "--new-tokens", "128", "--modes", "eager,static", "--out", "X"])
    assert (s.model, s.methods, s.batch_sizes, s.prompt_lens, s.out_dir) == (
        "llama2_7b_shape", ("base", "lora", "mixlora"), (1, 8, 32), (64,), "X")
    code = (
        "import sys, runpy\n"
        "for name in ('hydra', 'omegaconf', 'lm_eval', 'datasets'):\n"
        "    sys.modules[name] = None  # import -> ModuleNotFoundError, find_spec -> None: as if uninstalled\n"
        "sys.argv = ['__main__.py', '--model', 'tiny_shape', '--methods', 'base,lora', '--batch-sizes', '1',\n"
        f"            '--prompt-len', '4', '--new-tokens', '2', '--repeats', '1', '--modes', 'eager', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_module('moelora.bench', run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("files: ")  # the table is printed last
    assert "| lora | eager | 1 | 4 |" in proc.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["environment"]["command"].startswith("python -m moelora.bench --model tiny_shape")


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
    s = bench_cli.parse_args(["--rounds", "4", "--no-harness-check", "--no-paired", "--no-plots", "--no-decode-graphs",
                              "--time-budget-s", "30", "--lora-alpha", "8", "--prompt-lens", "4,8"])
    assert s.rounds == 4 and s.check_harness is False and s.paired is False and s.plots is False
    assert s.decode_graphs is False and s.time_budget_s == 30.0 and s.lora_alpha == 8.0 and s.prompt_lens == (4, 8)


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
    # repeats whose decode time is <= 0 (prefill noise on a loaded host) are left out of the ratio
    ratios = [m / b for m, b in zip(mix["decode_ms_repeats"], mix["paired_base_ms_repeats"]) if m > 0 and b > 0]
    if ratios:
        assert mix["decode_ratio_paired"] == pytest.approx(statistics.median(ratios))
    else:
        assert mix["decode_ratio_paired"] is None and mix["nonpositive_repeats"] > 0
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

    monkeypatch.setattr(latency, "timed_generate", fake_timed)
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

    monkeypatch.setattr(latency, "timed_generate", lambda *a, **k: (next(times), []))
    row = latency.measure_case(torch.nn.Linear(1, 1), torch.zeros(1, 2, dtype=torch.long), None, "eager",
                               _small(repeats=1, warmup=0, new_tokens=3), plain=True)
    assert row["nonpositive_repeats"] == 1
    assert row["hf_generate_ms_per_token"] == pytest.approx(10.0)
    assert row["harness_ratio"] == pytest.approx((-10 / 3) / 10.0)


def test_moelora_bench_console_entry_runs_and_names_unknown_keys(tmp_path):
    """``moelora-bench`` as installed (moelora.bench.cli:hydra_main), in a fresh process."""
    def run(*overrides):
        code = ("import sys\nfrom moelora.bench.cli import hydra_main\n"
                f"sys.argv = ['moelora-bench', *{list(overrides)!r}]\nhydra_main()\n")
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    run_dir = tmp_path / "run"
    proc = run("methods=[base,lora]", "modes=[eager]", "prompt_lens=[4]", "new_tokens=2", "repeats=1", "warmup=0",
               "plots=false", "paired=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| lora | eager | 1 | 4 |" in proc.stdout
    data = json.loads((run_dir / "bench.json").read_text())
    assert data["environment"]["command"].startswith("moelora-bench methods=[base,lora]")
    assert data["settings"]["out_dir"] == str(run_dir) and (run_dir / ".hydra" / "config.yaml").is_file()
    bad = run("new_tokenz=3", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "new_tokenz" in bad.stderr


def test_adapter_sizes_apply_to_every_family_and_adapters_override_per_family():
    s = BenchSettings(r=4, num_experts=4, top_k=1, adapters={"mixlora": {"num_experts": 2, "expert_backend": "eager"}})
    cfg = s.validate().adapter_configs()
    assert cfg["lora"] == {"method": "lora", "r": 4, "lora_alpha": 32.0, "lora_dropout": 0.0}
    assert (cfg["mixlora"]["num_experts"], cfg["mixlora"]["top_k"], cfg["mixlora"]["expert_backend"]) == (2, 1, "eager")
    assert cfg["lora_switch"]["num_experts"] == 4
    assert s.record()["adapter_configs"] == cfg  # bench.json keeps what was attached
    with pytest.raises(ValueError, match="unknown adapter family"):
        BenchSettings(adapters={"mixlora2": {}}).validate()


def test_write_json_is_atomic(tmp_path, monkeypatch):
    from moelora.bench import jsonio

    path = tmp_path / "sub" / "result.json"
    jsonio.write_json(path, {"rows": [1, 2], "where": tmp_path})  # folder created; a Path is written as str
    assert jsonio.read_json(path) == {"rows": [1, 2], "where": str(tmp_path)}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
    old = path.read_text()

    class Boom:
        def __str__(self):
            raise RuntimeError("failed mid-write")

    # json.dump streams into the temporary file: the rows before the bad value are already written
    with pytest.raises(RuntimeError, match="mid-write"):
        jsonio.write_json(path, {"rows": list(range(10_000)), "bad": Boom()})
    assert path.read_text() == old and sorted(p.name for p in path.parent.iterdir()) == ["result.json"]

    def no_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(jsonio.os, "replace", no_replace)  # the very last step fails
    with pytest.raises(OSError, match="disk gone"):
        jsonio.write_json(path, {"rows": []})
    assert path.read_text() == old and sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_version_recorder_fields(monkeypatch):
    import transformers

    from moelora.bench import versions

    rec = versions.record_versions("python kernels/benchmarks/x.py --out d")
    assert tuple(rec) == versions.FIELDS
    assert rec["torch"] == torch.__version__ and rec["transformers"] == transformers.__version__
    assert rec["moelora"] == moelora.__version__ and rec["cuda"] == torch.version.cuda
    assert rec["command"] == "python kernels/benchmarks/x.py --out d"
    assert (rec["gpu"] is None) == (not torch.cuda.is_available())
    if (REPO / ".git").exists():
        assert len(rec["git_commit"]) == 40 and isinstance(rec["git_dirty"], bool)
    assert versions.record_versions(["prog", "a b"])["command"] == "prog 'a b'"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/moelora-bench", "new_tokens=8"])
    assert versions.default_command() == "moelora-bench new_tokens=8"
    monkeypatch.setattr(sys, "argv", ["kernels/benchmarks/benchmark_merge.py", "--small"])
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "kernels/benchmarks/benchmark_merge.py", "--small"])
    assert versions.default_command() == "python kernels/benchmarks/benchmark_merge.py --small"
    assert versions.package_version("surely_not_installed_pkg") is None
    assert versions.git_commit("/") == (None, None)


def test_transformers_private_attributes_still_exist():
    """moelora/bench/_transformers_private.py: if this fails, transformers changed an internal the
    benchmark relies on; the message names it."""
    from moelora.bench import _transformers_private as hf_private

    missing = hf_private.missing_private_api()
    assert not missing, "\n".join(missing)
    # and they do what the benchmark assumes: a static-cache generate keeps the longest length
    model, _ = bench_models.build_shape_model("tiny_shape", dtype="float32", device="cpu")
    ids = torch.randint(4, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    assert hf_private.static_cache_length(model) >= ids.shape[1] + 1, "generate no longer records the static-cache length"
    hf_private.set_static_cache_length(model, 64)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    assert hf_private.static_cache_length(model) == 64, "generate no longer reuses the longest static-cache length"
    hf_private.forget_generate_state(model)
    assert not hasattr(model, hf_private.CACHE_LENGTH)


def test_timing_helper():
    from moelora.bench import timing

    calls = []
    times = timing.time_ms(lambda: calls.append(1), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7 and len(times) == 5 and all(t >= 0 for t in times)
    assert timing.median_ms(lambda: None, warmup=0, repeats=3, device="cpu") >= 0
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.percentile(xs, 0.5) == 3.0 and timing.percentile(xs, 0.0) == 1.0 and timing.percentile(xs, 1.0) == 5.0
    assert [timing.percentile(xs, q) for q in (0.2, 0.8)] == pytest.approx(
        [statistics.quantiles(xs, n=5, method="inclusive")[i] for i in (0, 3)])
    assert timing.median_or_none([]) is None


def test_gathered_lora_benchmark_presorted_segment_provider_agrees(tmp_path):
    """kernels/benchmarks/benchmark_gathered_lora.py --small: the serving step's form of the
    segment kernels (sorted once per routing, outside the timed calls) agrees with the reference;
    the script exits non-zero when a provider disagrees."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO / "kernels")}
    out = subprocess.run([sys.executable, str(REPO / "kernels/benchmarks/benchmark_gathered_lora.py"), "--small",
                          "--providers", "triton-segment", "triton-segment-sorted", "--modes", "shared-weighted",
                          "perslot-weighted", "--tokens", "40", "--passes", "fwd", "--out-dir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "gathered_lora_small.json").read_text())
    rows = [r for r in res["results"] if r["provider"] == "triton-segment-sorted"]
    assert len(rows) == 2 and all(r["median_ms"] > 0 for r in rows) and res["max_rel_disagreement"] < 1e-4
