"""python -m moelora.bench.training_step on the CPU (issue 19): a row per method with positive
tokens/s, the result files, different trainable counts for LoRA and MixLoRA, PEFT-relative ratios,
and one step really trains (the adapter moves, the frozen base does not)."""
import argparse
import csv
import json
import math
import sys

import pytest
import torch

from moelora.bench import training_step
from moelora.bench.versions import FIELDS

TINY = ["--model", "tiny_shape", "--layers", "2", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
        "--rounds", "1", "--device", "cpu"]


def test_cli_writes_a_row_per_method(tmp_path, capsys):
    pytest.importorskip("peft")
    res = training_step.main([*TINY, "--methods", "peft_lora,lora,mixlora", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["peft_lora", "lora", "mixlora"]
    for r in rows.values():
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["step_ms"] > 0 and r["tokens"] == 64
        assert math.isclose(r["tok_s"], 64 / (r["step_ms"] / 1e3))
        assert r["peak_mem_gb"] is None and math.isfinite(r["loss"])  # no peak memory on the CPU
        assert r["tok_s_x_peft"] > 0
    assert rows["peft_lora"]["tok_s_x_peft"] == 1.0
    assert rows["lora"]["trainable"] == rows["peft_lora"]["trainable"]  # same rank on the same 7 linears
    assert rows["mixlora"]["trainable"] > rows["lora"]["trainable"]  # 8 experts on the FFN + routers
    saved = json.loads((tmp_path / "training_step.json").read_text())
    assert all(k in saved["environment"] for k in FIELDS) and saved["environment"]["command"]
    assert [r["method"] for r in saved["round_rows"]] == ["peft_lora", "lora", "mixlora"]
    assert all(r["model_freed"] and r["held_before_gb"] is None for r in saved["round_rows"])  # no leak; CPU
    with open(tmp_path / "training_step.csv", newline="") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["peft_lora", "lora", "mixlora"]
    out = capsys.readouterr().out
    assert "| mixlora |" in out and "command:" in out and "device:" in out


def test_an_error_is_a_row_and_the_budget_skips(tmp_path, monkeypatch):
    real = training_step.build_method

    def broken(method, *args):
        if method == "lora":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(method, *args)

    monkeypatch.setattr(training_step, "build_method", broken)
    res = training_step.main([*TINY, "--rounds", "2", "--methods", "lora,mixlora_plain", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert "out of memory" in rows["lora"]["error"]
    assert "error" not in rows["mixlora_plain"] and rows["mixlora_plain"]["rounds"] == 2
    assert rows["mixlora_plain"]["tok_s_x_peft"] is None  # no PEFT baseline in this run
    assert [r["method"] for r in res["round_rows"]] == ["lora", "mixlora_plain"] * 2
    assert res["round_rows"][2]["error"].startswith("skipped after")
    from moelora.layers.dispatch import mixture_recompute_enabled

    assert mixture_recompute_enabled()  # the eager twin's switch is put back
    res = training_step.main([*TINY, "--methods", "lora", "--time-budget-s", "-1", "--out", str(tmp_path)])
    assert res["rows"][0]["error"].startswith("skipped: time budget")


@pytest.mark.parametrize("method", ["lora", "mixlora"])
def test_one_step_trains_the_adapter_only(method):
    a = argparse.Namespace(model="tiny_shape", layers=2, r=4, dropout=0.0, seed=0, experts=4, top_k=2)
    device = torch.device("cpu")
    model = training_step.build_method(method, a, device, torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    step, params = training_step.make_step(model, ids, device, autocast=False)
    assert params and all(p.requires_grad for p in params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = float(step())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    for _ in range(4):
        loss = float(step())
    assert loss < loss0  # same batch, lr 3e-3: the loss goes down


def test_profile_writes_an_op_table_per_method(tmp_path):
    res = training_step.main([*TINY, "--methods", "mixlora", "--profile", "--out", str(tmp_path)])
    prof = res["round_rows"][0]["profile"]
    assert prof["aten_ops"] > 0 and prof["wall_ms"] > 0 and prof["device_busy_ms"] is None  # CPU
    table = (tmp_path / prof["table"]).read_text()
    assert prof["table"] == "profile_mixlora.txt" and "aten::" in table


@pytest.mark.parametrize("method,package", [("moe_peft_mixlora", "moe_peft"), ("mlora_mixlora", "mlora")])
def test_baseline_mixlora_trains_the_same_adapter_shape(method, package, tmp_path):
    """MoE-PEFT's / mLoRA's MixLoRA (optional: ``pip install --no-deps moe-peft==2.0.2 mlora==0.5.2``)
    beside ours: the same trainable count (experts on gate/up/down, LoRA on attention, router), and
    its step trains."""
    pytest.importorskip(package)
    res = training_step.main([*TINY, "--methods", f"mixlora,{method}", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert "error" not in rows[method], rows[method]
    assert rows[method]["trainable"] == rows["mixlora"]["trainable"]
    assert rows[method]["tok_s"] > 0 and math.isfinite(rows[method]["loss"])


def test_moe_peft_imports_without_its_trainer_dependencies(monkeypatch):
    """The GPU machine has neither ``datasets`` nor ``evaluate``, which MoE-PEFT's package
    ``__init__`` imports for its trainer and task metrics: placeholders stand in while it is
    imported, and are gone afterwards."""
    pytest.importorskip("moe_peft")
    from moelora.bench import moe_peft_baseline

    absent = ("datasets", "evaluate")

    class Missing:  # a finder that makes the two packages uninstalled
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in absent:
                raise ModuleNotFoundError(f"No module named {name!r}")

    for name in [m for m in sys.modules if m.split(".")[0] in (*absent, "moe_peft")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])
    assert moe_peft_baseline._import().__name__ == "moe_peft"
    assert not any(m in sys.modules for m in absent)


def test_moe_peft_step_in_bf16_runs_as_its_trainer_runs_it():
    """A bf16 base with autocast asked for (the GPU rows): MoE-PEFT's step runs without autocast,
    as its own trainer does (its fused LoRA backward fails under one: fp32 vs bf16 gradients)."""
    pytest.importorskip("moe_peft")
    a = argparse.Namespace(model="tiny_shape", layers=2, r=4, dropout=0.05, experts=4, top_k=2, seed=0)
    model = training_step.build_method("moe_peft_mixlora", a, torch.device("cpu"), torch.bfloat16)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    step, params = training_step.make_step(model, ids, torch.device("cpu"), autocast=True)
    before = [p.detach().clone() for p in params]
    assert math.isfinite(float(step()))
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the step changed no adapter tensor"


@pytest.mark.parametrize("package", ["moe_peft", "mlora"])
def test_importing_a_baseline_leaves_the_callers_logging_as_it_was(package):
    """MoE-PEFT and mLoRA call logging.basicConfig(force=True) on import; the bench puts the root
    logger's handlers and level back (checked in a fresh process: the import runs once per process)."""
    import subprocess

    pytest.importorskip(package)
    code = f"""
import logging, sys
h = logging.StreamHandler(sys.stdout); logging.getLogger().addHandler(h); logging.getLogger().setLevel(logging.DEBUG)
from moelora.bench import moe_peft_baseline as mb
mb._import({package!r})
assert {package!r} in sys.modules
root = logging.getLogger()
print(h in root.handlers, len(root.handlers), root.level)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["True", "1", str(10)], out.stdout
