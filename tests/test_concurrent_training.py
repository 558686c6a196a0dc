"""Concurrent training (moelora.training.concurrent, issue 17): many adapters over one frozen base.

The central check: a job trained beside others equals the same job trained alone, every adapter
tensor to 1e-4 relative after 20 steps with dropout on (per-job dropout streams), where "alone" is
both the ordinary ``moelora-train`` path (Lightning) and ``train_concurrently([cfg])``; LoRA and
MixLoRA jobs of different ranks, seeds and batch sizes mixed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
from moelora.cli import compose_train_config, train
from moelora.training.concurrent import train_concurrently

FAST = [
    "model.hidden_size=32", "model.intermediate_size=64",
    "data.n_train=24", "data.n_val=2", "data.n_test=2", "data.batch_size=8", "data.eval_batch_size=16",
    "callbacks.progress_bar.refresh_rate=0", "module.router_stats_every_n_steps=0",
]
# No evaluation and no plots: the equivalence test compares the trained tensors only.
QUIET = ["test=false", "plot=false", "trainer.val_check_interval=1000", "trainer.log_every_n_steps=5"]
STEPS = 20
# Three jobs that differ in everything a job owns: method, rank, dropout, seed, batch size, LR.
JOBS = {
    "lora_r4": ["adapter=lora", "adapter.r=4", "adapter.lora_dropout=0.1", "seed=1"],
    "mixlora_r8": ["adapter=mixlora", "adapter.r=8", "adapter.num_experts=4", "adapter.lora_dropout=0.2", "seed=2",
                   "data.batch_size=6", "module.optimizer.lr=1e-2"],
    "lora_r8": ["adapter=lora", "adapter.r=8", "adapter.lora_dropout=0.1", "seed=3", "data.batch_size=4"],
}


def _cfg(tmp_path: Path, job: str, where: str, *extra: str):
    return compose_train_config([*FAST, *QUIET, f"trainer.max_steps={STEPS}", *JOBS[job], *extra],
                                output_dir=tmp_path / where / job)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-12)
        err = ((a[k] - b[k]).abs().max() / scale).item()
        assert err <= 1e-4, f"{what}: {k} differs by {err:.2e} (relative to its max)"


def test_a_job_beside_others_equals_the_job_alone(tmp_path: Path) -> None:
    solo = {}
    for job in ("lora_r4", "mixlora_r8"):  # the ordinary moelora-train path (Lightning)
        train(_cfg(tmp_path, job, "solo"))
        solo[job] = _adapter(tmp_path / "solo" / job)
    single = train_concurrently([_cfg(tmp_path, "lora_r4", "n1")], progress=False)
    assert single[0]["status"] == "finished" and single[0]["global_step"] == STEPS
    _assert_same_tensors(_adapter(tmp_path / "n1" / "lora_r4"), solo["lora_r4"], "N=1 vs moelora-train")

    mixed = train_concurrently([_cfg(tmp_path, j, "n3") for j in JOBS], progress=False)
    assert [r["status"] for r in mixed] == ["finished"] * 3
    for job in ("lora_r4", "mixlora_r8"):
        _assert_same_tensors(_adapter(tmp_path / "n3" / job), solo[job], f"{job}: N=3 vs moelora-train")
    # the test would pass trivially if nothing trained: the B factors left zero
    assert all(v.abs().max() > 0 for k, v in solo["mixlora_r8"].items() if "lora_B" in k)
    # and it can fail: the same job with another dropout stream (seed) ends elsewhere
    other = train_concurrently([_cfg(tmp_path, "lora_r4", "other", "seed=7")], progress=False)
    with pytest.raises(AssertionError):
        _assert_same_tensors(_adapter(tmp_path / "other" / "lora_r4"), solo["lora_r4"], "another seed")
    assert other[0]["status"] == "finished"
