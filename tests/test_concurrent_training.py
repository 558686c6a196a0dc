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
        # results.json's throughput as a solo run's: the same batches and tokens, and with how many
        # jobs the steps were shared
        alone = json.loads((tmp_path / "solo" / job / "results.json").read_text())["throughput"]
        beside = json.loads((tmp_path / "n3" / job / "results.json").read_text())["throughput"]
        for k in ("train_batches", "train_tokens"):
            assert beside[k] == alone[k], (job, k, beside, alone)
        assert beside["train_tokens_per_s"] > 0 and 1 < beside["concurrent_jobs_mean"] <= 3
        assert "concurrent_jobs_mean" not in alone
    assert "concurrent_jobs_mean" not in single[0]["throughput"]
    # the test would pass trivially if nothing trained: the B factors left zero
    assert all(v.abs().max() > 0 for k, v in solo["mixlora_r8"].items() if "lora_B" in k)
    # and it can fail: the same job with another dropout stream (seed) ends elsewhere
    other = train_concurrently([_cfg(tmp_path, "lora_r4", "other", "seed=7")], progress=False)
    with pytest.raises(AssertionError):
        _assert_same_tensors(_adapter(tmp_path / "other" / "lora_r4"), solo["lora_r4"], "another seed")
    assert other[0]["status"] == "finished"


def test_failed_jobs_are_stopped_and_the_others_go_on(tmp_path: Path) -> None:
    """A job whose loss turns non-finite and one whose data file is missing fail with their error;
    the job beside them trains exactly as it does alone (their failure leaks nothing into it)."""
    # AdamW's eps 1e-6, not 1e-8: its first steps divide by |g| + eps, so an element whose gradient
    # is ~1e-8 turns the ~1e-7 rounding difference of the base GEMMs over a packed batch of another
    # shape into a ~1e-3 difference of its update. Measured on a 2-core AMD EPYC (fp32, healthy
    # neighbours, dropout 0.1, 6 steps): 3.4e-4 relative with eps 1e-8 (6.9e-3 after one step, in one
    # tensor), 4.4e-6 with eps 1e-6, 1.0e-6 with dropout 0; the masks were checked equal. The test is
    # about what a failing neighbour leaks, not about that amplifier.
    ok = ["adapter=lora", "adapter.lora_dropout=0.1", "trainer.max_steps=6", "+module.optimizer.eps=1e-6"]
    cfgs = [
        compose_train_config([*FAST, *QUIET, *ok], output_dir=tmp_path / "mix" / "ok"),
        compose_train_config([*FAST, *QUIET, *ok, "module.optimizer.lr=1e30", "trainer.gradient_clip_val=null"],
                             output_dir=tmp_path / "mix" / "diverges"),
        compose_train_config([*FAST, *QUIET, *ok, "data.source=/nonexistent/train.jsonl"],
                             output_dir=tmp_path / "mix" / "no_data"),
        compose_train_config([*FAST, *QUIET, *ok, "resume=true"], output_dir=tmp_path / "mix" / "resume_flag"),
    ]
    res = train_concurrently(cfgs, progress=False)
    assert [r["status"] for r in res] == ["finished", "failed", "failed", "failed"]
    assert "hydra.launcher.resume=true" in res[3]["error"]
    assert "train/loss is nan" in res[1]["error"] and "/nonexistent/train.jsonl" in res[2]["error"]
    on_disk = json.loads((tmp_path / "mix" / "no_data" / "results.json").read_text())
    assert on_disk["status"] == "failed" and "/nonexistent/train.jsonl" in on_disk["error"]
    alone = train_concurrently([compose_train_config([*FAST, *QUIET, *ok], output_dir=tmp_path / "alone")],
                               progress=False)
    assert alone[0]["status"] == "finished"
    _assert_same_tensors(_adapter(tmp_path / "mix" / "ok"), _adapter(tmp_path / "alone"), "beside failing jobs")


def test_resume_continues_every_unfinished_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after 3 optimizer steps (checkpoints every 2), the resumed run ends where the
    uninterrupted one ends, for every job; a queued job (max_concurrent_jobs=2) starts on resume."""
    from moelora.training import concurrent

    jobs = list(JOBS)
    extra = ["trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=2"]
    full = train_concurrently([_cfg(tmp_path, j, "full", *extra) for j in jobs], max_concurrent_jobs=2, progress=False)
    assert [r["status"] for r in full] == ["finished"] * 3

    calls = {"n": 0}
    step = concurrent._GroupLoop._optimizer_step

    def killed_after_three(self, job, *rest):
        if calls["n"] == 3 * 2:  # both running jobs did 3 steps
            raise KeyboardInterrupt
        calls["n"] += 1
        step(self, job, *rest)

    monkeypatch.setattr(concurrent._GroupLoop, "_optimizer_step", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_concurrently([_cfg(tmp_path, j, "cut", *extra) for j in jobs], max_concurrent_jobs=2, progress=False)
    monkeypatch.setattr(concurrent._GroupLoop, "_optimizer_step", step)
    assert not (tmp_path / "cut" / jobs[2] / "adapter").exists()  # queued behind the two running jobs
    resumed = train_concurrently([_cfg(tmp_path, j, "cut", *extra) for j in jobs], max_concurrent_jobs=2,
                                 resume=True, progress=False)
    assert [r["status"] for r in resumed] == ["finished"] * 3
    for j in jobs:
        _assert_same_tensors(_adapter(tmp_path / "cut" / j), _adapter(tmp_path / "full" / j), f"{j} resumed")


REPO = Path(__file__).resolve().parents[1]


def test_sweep_with_the_concurrent_launcher(tmp_path: Path) -> None:
    """``moelora-train -m ... hydra/launcher=concurrent``: one process, one base for the group,
    every job's run directory as a solo run's, the sweep summary; a job whose data file is missing
    is listed as failed with its error and the sweep exits 2 after the others finished."""
    import os
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    env = {**os.environ, "MOELORA_LOG_DIR": str(tmp_path / "logs"), "HF_HUB_OFFLINE": "1",
           # the repo first: an editable install made before the launcher existed does not map hydra_plugins
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MOELORA_DEBUG", None)
    args = ["-m", "adapter=lora,mixlora", "data.source=synthetic,/nonexistent/train.jsonl", *FAST,
            "trainer.max_steps=3", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "hydra/launcher=concurrent", "hydra.launcher.max_concurrent_jobs=1", "hydra.launcher.progress=false",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "-m", "moelora.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    log = (sweep / "concurrent.log").read_text()
    assert log.count("loading base model") == 1 and "shared by 4 jobs" in log
    rows = {r["job"]: r for r in __import__("csv").DictReader((sweep / "summary.csv").open())}
    by_status = {j: r["status"] for j, r in rows.items()}
    assert sorted(by_status.values()) == ["failed", "failed", "finished", "finished"], by_status
    for job, row in rows.items():
        run = sweep / job
        assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
        if row["status"] == "failed":
            assert "/nonexistent/train.jsonl" in row["error"] and "data.source=/nonexistent" in row["overrides"]
            continue
        results = json.loads((run / "results.json").read_text())
        assert results["global_step"] == 3 and results["method"] in ("lora", "mixlora")
        assert "test/acc" in results["metrics"] and "val/loss" in results["metrics"]
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"step", "train/loss", "train/lr", "val/loss"} <= set(header)
        assert (run / "curves.png").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
        assert moelora.load_adapter(__import__("moelora.training.tiny", fromlist=["x"]).tiny_llama(
            hidden_size=32, intermediate_size=64)[0], run / "adapter") is not None
    assert "Sweep summary" in proc.stdout
    assert proc.stderr.count("moelora-train: error: job") == 2 and "2 sweep job(s) failed" in proc.stderr


def test_the_launcher_is_packaged() -> None:
    """Hydra finds launchers in its ``hydra_plugins`` namespace package: ours must be in the
    package list (editable and wheel installs) and the namespace must stay without __init__.py."""
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "hydra_plugins.moelora_concurrent" in packages
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()
    assert (REPO / "hydra_plugins" / "moelora_concurrent" / "__init__.py").is_file()
    # moelora-train registers it itself too (editable installs hide the namespace from Hydra's scan)
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    from moelora.cli import _register_concurrent_launcher

    _register_concurrent_launcher()
    assert "ConcurrentLauncher" in [c.__name__ for c in Plugins.instance().discover(Launcher)]


# ---- the gathered mixed-batch training forms against the eager loop ------------------------------
MIXED_ADAPTERS = {
    "lora_r4": moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1),
    "lora_r8": moelora.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.2, target_modules=("q_proj", "v_proj", "up_proj")),
    "mix_e4k2": moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.1),
    "mix_e2k1": moelora.MixLoraConfig(num_experts=2, top_k=1, r=6, lora_alpha=12, lora_dropout=0.3),
}


def _mixed_batch_grads(arch: str, eager: bool, seed: int, seq: int = 11,
                       adapters: dict = MIXED_ADAPTERS, device: str = "cpu") -> tuple[torch.Tensor, dict, dict]:
    """Logits, aux losses and every adapter gradient of one training forward/backward of a mixed
    batch (every adapter twice, one base row, right padding), with seeded dropout streams; the
    model on ``device`` (inputs drawn on the CPU, results returned there)."""
    from conftest import make_tiny, randomize_adapter_

    from moelora.layers.dispatch import eager_mixed_batches
    from moelora.state import BatchPlan

    model = make_tiny(arch)
    for i, (name, cfg) in enumerate(adapters.items()):
        if i == 0:
            moelora.inject_adapter(model, cfg, adapter_name=name)
        else:
            moelora.add_adapter(model, name, cfg)
    randomize_adapter_(model, seed=seed)
    model.to(device)
    for i, name in enumerate(adapters):
        moelora.adapter_state(model).seed_dropout(name, 100 + i, device=device)
    g = torch.Generator().manual_seed(seed)
    names = (*adapters, None, *adapters)
    B, T = len(names), seq
    ids = torch.randint(0, 61, (B, T), generator=g)
    lengths = torch.randint(min(3, T), T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    plan = BatchPlan(None, names, device=device)
    plan.lengths = tuple(int(lengths.max()) - (s % 2) for s in range(len(plan.slot_names)))  # own lengths < T too
    model.train()
    ids, mask = ids.to(device), mask.to(device)
    with eager_mixed_batches(eager):
        out = model(input_ids=ids, attention_mask=mask, adapter_names=plan)
    weights = torch.randn(out.logits.shape, generator=g).to(device)
    ((out.logits * weights * mask[..., None]).sum() + sum(out.aux_losses.values())).backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n for n in grads)
    return ((out.logits.detach() * mask[..., None]).cpu(), {k: v.detach().cpu() for k, v in out.aux_losses.items()},
            grads)


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # phi3: fused qkv and gate_up projections
def test_gathered_mixed_training_equals_the_eager_loop(arch: str) -> None:
    """fp32, fresh random inputs: the one-GEMM-pair LoRA form and the virtual-expert MixLoRA form
    give the eager loop's logits, aux losses and gradients (dropout on, per-adapter streams)."""
    for seed in (0, 1):
        ref_logits, ref_aux, ref_grads = _mixed_batch_grads(arch, eager=True, seed=seed)
        logits, aux, grads = _mixed_batch_grads(arch, eager=False, seed=seed)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert aux.keys() == ref_aux.keys() == {"mix_e4k2", "mix_e2k1"}
        for k in aux:
            torch.testing.assert_close(aux[k], ref_aux[k], rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        assert any("mix_e2k1" in n and "router" in n for n in grads)  # the aux loss reaches the routers
        for n in grads:  # fp32 sums of many terms: the absolute error grows with the gradient's scale
            # (e.g. 8.8e-5 on an entry of a gradient of max 16). Measured against a float64 run of the
            # same batches (seeds 0-3): each fp32 path is up to 4.4e-5 of the gradient's scale from it,
            # and moving where LoRA's scale is applied (2026-12-04) moved that between 1e-5 and 4e-5:
            # rounding, which a wrong mask or scale (errors of 1e-2 and more) exceeds by far.
            scale = max(1.0, ref_grads[n].abs().max().item())
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=6e-5 * scale, msg=n)


def test_gathered_forms_are_what_mixed_training_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training forward of a mixed batch takes the gathered forms, and the eager switch the
    loop: the comparison above compares two different code paths."""
    from moelora.layers import adapted

    calls = {"_lora_slots_train": 0, "_virtual_experts": 0}

    def counted(fn):
        orig = getattr(adapted, fn)

        def wrapper(*args, **kwargs):
            calls[fn] += 1
            return orig(*args, **kwargs)
        monkeypatch.setattr(adapted, fn, wrapper)

    for fn in calls:
        counted(fn)
    _mixed_batch_grads("llama", eager=False, seed=0)
    assert calls["_lora_slots_train"] > 0 and calls["_virtual_experts"] == 2  # two decoder layers
    calls.update({k: 0 for k in calls})
    _mixed_batch_grads("llama", eager=True, seed=0)
    assert calls == {"_lora_slots_train": 0, "_virtual_experts": 0}


def test_benchmark_smoke_mode_writes_its_tables(tmp_path: Path) -> None:
    """``python -m moelora.bench.concurrent_training --device cpu --model tiny``: every mode's row
    (jobs/hour, non-padding tokens/s, peak memory) with versions and command, as JSON and CSV."""
    import csv

    from moelora.bench import concurrent_training as bench

    result = bench.main(["--device", "cpu", "--model", "tiny", "--jobs", "1,2", "--steps", "2", "--warmup", "0",
                         "--rows", "2", "--seq", "12", "--out", str(tmp_path)])
    rows = result["results"]
    # the modes' order alternates from one N to the next (neither always pays the first-time costs)
    assert [(r["n_jobs"], r["mode"]) for r in rows] == [(1, "concurrent"), (1, "sequential"),
                                                         (2, "sequential"), (2, "concurrent")]
    for r in rows:
        assert r["jobs_per_hour"] > 0 and r["tokens_per_s"] > 0 and r["label_tokens"] > 0
        assert r["peak_mem_gib"] is None  # CPU: no device memory counter
        assert r["setup_s"] > 0  # adding/deleting the adapters: reported, not in the steps' time
    # the same jobs see the same tokens in both modes
    assert rows[2]["label_tokens"] == rows[3]["label_tokens"] and "speedup_vs_sequential" in rows[3]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["versions"]["command"] and on_disk["versions"]["torch"] and on_disk["device"] == "cpu"
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == len(rows)


def test_benchmark_profile_is_of_a_steady_step_not_the_setup(tmp_path: Path) -> None:
    """``--profile``: the table is of one training step after the adapters exist and their
    optimizers have stepped once; adapter creation (LoRA A's kaiming init: ``uniform_``) and the
    first step's optimizer state are outside it, so its op count is one step's (what a profile of
    the whole ``train_steps`` call, setup included, reports more than)."""
    from moelora.bench import concurrent_training as bench
    from moelora.bench.profiling import profile_call

    result = bench.main(["--device", "cpu", "--model", "tiny", "--jobs", "2", "--steps", "1", "--warmup", "0",
                         "--rows", "2", "--seq", "12", "--modes", "concurrent", "--profile", "--out", str(tmp_path)])
    prof = result["results"][0]["profile"]
    table = (tmp_path / prof["table"]).read_text()
    assert "aten::" in table
    s = bench.Settings(model="tiny", device="cpu", rows=2, seq=12, steps=1, warmup=0)
    model = bench.build_base(s, torch.device("cpu"), torch.float32).requires_grad_(False)
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 2) for j in range(2)}
    whole = profile_call(lambda: bench.train_steps(model, s, [0, 1], 1, batches, 0), torch.device("cpu"),
                         tmp_path / "whole.txt", rows=1000)  # the old --profile: setup and first step included
    assert "aten::uniform_" in (tmp_path / "whole.txt").read_text()
    assert prof["aten_ops"] < whole["aten_ops"]


@pytest.mark.parametrize("package", ["moe_peft", "mlora"])
def test_benchmark_baseline_modes_train_the_same_jobs(package: str, tmp_path: Path) -> None:
    """``--modes concurrent,<package>``: MoE-PEFT 2.0.2 / mLoRA 0.5.2 (``pip install --no-deps``) train
    the same N jobs (a LoRA and a MixLoRA adapter of the same shapes) on the same tokens, and a step
    moves every job's adapter."""
    pytest.importorskip(package)
    from moelora.bench import concurrent_training as bench
    from moelora.bench import moe_peft_baseline as mp

    args = ["--device", "cpu", "--model", "tiny_shape", "--jobs", "2", "--steps", "2", "--warmup", "0", "--rows", "2",
            "--seq", "12", "--lora-r", "4", "--mix-r", "4", "--mix-experts", "4"]
    result = bench.main([*args, "--modes", f"concurrent,{package}", "--out", str(tmp_path)])
    rows = {r["mode"]: r for r in result["results"]}
    assert "error" not in rows[package], rows[package]
    assert rows[package]["label_tokens"] == rows["concurrent"]["label_tokens"] > 0
    assert rows[package]["jobs_per_hour"] > 0
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.main([*args, "--modes", "concurent", "--out", str(tmp_path / "bad")])
    # the same adapters: the baseline's trainable count per job equals moelora's
    s, _ = bench._parse(args)
    llm = bench._moe_peft_model(s, 2, torch.device("cpu"), torch.float32, package)
    assert type(llm).__module__.split(".")[0] == package
    model = bench.build_base(s, torch.device("cpu"), torch.float32).requires_grad_(False)
    names, _ = bench._attach(model, s, [0, 1])
    for j in (0, 1):
        ours = sum(p.numel() for n, p in model.named_parameters() if f"adapters.{names[j]}." in n)
        assert sum(t.numel() for t in mp.params(llm, f"job{j}")) == ours, j
    before = {j: [t.detach().clone() for t in mp.params(llm, f"job{j}")] for j in (0, 1)}
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 1) for j in (0, 1)}
    bench.moe_peft_steps(llm, s, [0, 1], 1, batches, 0)
    for j in (0, 1):
        assert any(not torch.equal(a, b) for a, b in zip(before[j], mp.params(llm, f"job{j}"))), j


def test_token_budget_and_queue_keep_every_job_as_it_is_alone(tmp_path: Path) -> None:
    """``tokens_per_step`` smaller than any micro-batch: one job per forward, round robin (a job
    alone over the budget still runs); ``max_concurrent_jobs=2`` queues the third job. Every job
    still ends where it ends alone."""
    jobs = list(JOBS)
    steps = {"lora_r4": 4, "mixlora_r8": 2, "lora_r8": 4}  # the second finishes first; the queued third takes its place
    res = train_concurrently([_cfg(tmp_path, j, "budget", f"trainer.max_steps={steps[j]}") for j in jobs],
                             max_concurrent_jobs=2, tokens_per_step=1, progress=False)
    assert [r["status"] for r in res] == ["finished"] * 3 and [r["global_step"] for r in res] == list(steps.values())
    for j in jobs:
        train_concurrently([_cfg(tmp_path, j, "alone", f"trainer.max_steps={steps[j]}")], progress=False)
        _assert_same_tensors(_adapter(tmp_path / "budget" / j), _adapter(tmp_path / "alone" / j), j)


@pytest.mark.slow
def test_gathered_mixed_training_through_the_triton_kernel() -> None:
    """The GPU form of mixed MixLoRA training (the gathered Triton kernel and its backward; on CPU
    through Triton's interpreter, which the root conftest turns on) gives the eager loop's logits,
    aux losses and gradients."""
    from moelora_kernels import backend

    if not (torch.cuda.is_available() or backend.interpreted()):
        pytest.skip("needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)")
    from moelora.layers import adapted

    # one MixLoRA adapter in the batch: the kernel (two or more take the batched segmented form)
    one_mix = {k: v for k, v in MIXED_ADAPTERS.items() if k != "mix_e2k1"}
    # on a GPU machine the model goes to CUDA (the kernel takes no CPU tensors without the interpreter)
    dev = "cpu" if backend.interpreted() else "cuda"
    ref = _mixed_batch_grads("llama", eager=True, seed=0, seq=4, adapters=one_mix, device=dev)  # short: the interpreter is slow
    calls = {"seg": 0}
    orig = adapted._segmented_expert_lora

    def counted(*a, **k):
        calls["seg"] += 1
        return orig(*a, **k)
    adapted._segmented_expert_lora = counted
    try:
        with moelora.kernel_backend("triton"):
            got = _mixed_batch_grads("llama", eager=False, seed=0, seq=4, adapters=one_mix, device=dev)
    finally:
        adapted._segmented_expert_lora = orig
    assert calls["seg"] == 0  # the experts went through the Triton kernel
    # the interpreter computes in fp32; on a GPU Triton's fp32 dots may round as TF32
    loose = 1 if dev == "cpu" else 100
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5 * loose, atol=1e-5 * loose)
    for k in ref[1]:
        torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-5 * loose, atol=1e-6 * loose)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-3 * min(loose, 10), atol=1e-4 * loose, msg=n)


def test_jobs_on_different_bases_run_group_by_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Jobs whose model configs differ cannot share a base: one group each, said in the log."""
    import logging

    sizes = {"a": "model.hidden_size=32", "b": "model.hidden_size=48", "c": "model.hidden_size=32"}
    cfgs = [compose_train_config([*FAST, *QUIET, "trainer.max_steps=2", "adapter=lora", size],
                                 output_dir=tmp_path / name) for name, size in sizes.items()]
    with caplog.at_level(logging.INFO, logger="moelora.train.concurrent"):
        res = train_concurrently(cfgs, progress=False)
    assert [r["status"] for r in res] == ["finished"] * 3
    assert "3 jobs need 2 different base models" in caplog.text
    assert "group 0: jobs [0, 2]" in caplog.text and "group 1: jobs [1]" in caplog.text
    assert caplog.text.count("loading base model") == 2


# ---- memory and shapes of the packed step ---------------------------------------------------------
def test_saved_activations_grow_with_the_jobs_not_faster() -> None:
    """What autograd keeps for backward in one packed step of N jobs (LoRA and MixLoRA alternating,
    fixed tokens per job) is about the sum of what each job keeps alone: per-job bytes do not grow
    with N. Before the fix the mixed step kept 1.6x the jobs' own (the MixLoRA mixture over every
    token of the batch, index_add_ keeping its (P, n, ...) sources alive)."""
    from moelora.bench import concurrent_training as bench

    torch.manual_seed(0)
    s = bench.Settings(model="tiny_shape", device="cpu", rows=4, seq=64, pad_multiple=0)
    model = bench.build_base(s, torch.device("cpu"), torch.float32).requires_grad_(False)
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 1) for j in range(8)}
    alone = [bench.step_profile(model, s, [j], batches, 0)["saved_bytes"] for j in range(8)]
    for n in (4, 8):
        together = bench.step_profile(model, s, list(range(n)), batches, 0)["saved_bytes"]
        # 1.6 before the fix; 1.105 (N=4) and 1.163 (N=8) now, the same in every run since the
        # counter keeps the storages it saw alive (before, a freed storage's reused address hid
        # later ones and the counts varied by ~10% between runs: CI once read 1.31). Padding to
        # the longest job's length costs a few percent. Since the solo forms keep their dropout
        # masks as bools too (as the mixed ones did), the jobs alone keep less: N=8 alone 45.6 ->
        # 42.1 MB, together unchanged at 53.1 MB, so the ratio reads 1.262 (N=8).
        assert together <= 1.3 * sum(alone[:n]), (n, together, sum(alone[:n]))


def test_saved_storages_counts_a_storage_whose_address_was_freed_and_reused() -> None:
    """Two saved storages of the same size, the first freed before the second is made: the
    allocator may give the second the first's address, and a counter keyed by address alone would
    then count one of them (the cause of run-to-run noise in the saved-bytes counts)."""
    from moelora.bench.saved_tensors import SavedStorages

    w = torch.nn.Parameter(torch.randn(256, 256))
    with SavedStorages(torch.nn.Linear(1, 1)) as saved:
        for _ in range(4):
            x = torch.randn(64, 256)
            (x @ w).sum()  # saves x; graph and x dropped right after
            del x
    assert saved.nbytes >= 4 * 64 * 256 * 4, saved.entries


def test_padding_to_a_multiple_changes_no_job_numbers() -> None:
    """``pad_to_multiple_of``: the packed length rounded up (shapes repeat on the GPU); every
    job's loss, aux loss and gradients equal those of the unpadded packed step (padding is masked,
    dropout drawn in each job's own length)."""
    from moelora.bench import concurrent_training as bench
    from moelora.training.packing import pack_micro_batches, per_job_losses

    s = bench.Settings(model="tiny_shape", device="cpu", rows=3, seq=20)
    model = bench.build_base(s, torch.device("cpu"), torch.float32).requires_grad_(False)
    batches = {j: bench.job_batches(s, j, model.config.vocab_size, 1) for j in range(3)}
    names, _ = bench._attach(model, s, [0, 1, 2])
    model.train()

    def step(multiple):
        for j in range(3):  # the same dropout draws in both runs
            moelora.adapter_state(model).seed_dropout(names[j], 7 + j)
        packed = pack_micro_batches([batches[j][0] for j in range(3)], list(names.values()), 0,
                                    pad_to_multiple_of=multiple)
        out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                    adapter_names=packed.adapter_names)
        losses = [l + out.aux_losses[names[j]] if names[j] in out.aux_losses else l
                  for j, l in enumerate(per_job_losses(out.logits, packed))]
        sum(losses).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return packed, torch.stack(losses).detach(), grads

    plain, ref_losses, ref_grads = step(None)
    padded, losses, grads = step(64)
    assert plain.input_ids.shape[1] < 64 and padded.input_ids.shape[1] == 64
    assert padded.label_tokens() == plain.label_tokens()
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_two_mixlora_jobs_take_the_segmented_form_even_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Triton backend on (the GPU's dispatch; the interpreter on CPU), a mixed training
    batch of two MixLoRA adapters runs their experts through the batched segmented form (linear in
    the adapters; the kernel's one-hot backward over a P·E_max-expert stack is quadratic), which
    equals the eager loop (test above) and calls no gathered kernel."""
    from moelora.layers import adapted, experts

    calls = {"seg": 0, "kernel": 0}
    orig_seg, orig_kernel = adapted._segmented_expert_lora, experts._gathered_lora

    def seg(*a, **k):
        calls["seg"] += 1
        return orig_seg(*a, **k)

    def kernel(*a, **k):
        calls["kernel"] += 1
        return orig_kernel(*a, **k)
    monkeypatch.setattr(adapted, "_segmented_expert_lora", seg)
    monkeypatch.setattr(experts, "_gathered_lora", kernel)
    with moelora.kernel_backend("triton"):
        _mixed_batch_grads("llama", eager=False, seed=0, seq=4)
    assert calls["seg"] > 0 and calls["kernel"] == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_shrink_equals_the_plain_composition_and_saves_less(autocast: bool) -> None:
    """``_LoraShrink`` (the shrink of mixed LoRA training: saves the 16-bit input and bool masks,
    recomputes their product in backward, no fp32 round trip of x under autocast) gives exactly
    the plain composition's output and gradients (bf16 activations, fp32 adapter weights; with
    and without bf16 autocast; the dropout's 1/(1-p) applied to h after it, as the slot scales
    apply it), and keeps fewer bytes for backward."""
    from moelora.layers.adapted import _LoraShrink

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 10, 16, generator=g).to(torch.bfloat16)
    A0 = torch.randn(3, 4, 16, generator=g)
    keep = torch.rand(3, 10, 16, generator=g) > 0.3
    scale = torch.tensor([1 / 0.7, 1.0, 1 / 0.9]).view(-1, 1, 1)
    gh = torch.randn(3, 10, 4, generator=g)

    def run(fused):
        x, A = x0.clone().requires_grad_(True), A0.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if fused:
                    h = _LoraShrink.apply(x, keep, A) * scale
                else:
                    h = torch.bmm(x.to(A.dtype) * keep.float(), A.transpose(1, 2)) * scale
        h.backward(gh.to(h.dtype))
        return h.detach(), x.grad, A.grad, sum(saved)

    ref, got = run(False), run(True)
    for a, b in zip(ref[:3], got[:3]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[3] < ref[3]


def test_stacked_keep_masks_are_each_adapters_own_draws() -> None:
    """``_stacked_keeps`` (one gather, by the plan's ``keep_index``, lays out every adapter's
    dropout mask at a gathered LoRA site) gives, row for row, what ``AdapterState.dropout_keep``
    draws for each adapter from a same-seeded stream: own row lengths shorter than the batch's
    (ones past them) and not, an adapter with dropout off (all kept), the padding rows up to n
    (all kept)."""
    from conftest import make_tiny

    from moelora.layers.adapted import _stacked_keeps
    from moelora.state import BatchPlan

    model = make_tiny("llama")
    names = ["a", "b", "c", "d"]
    for i, name in enumerate(names):
        cfg = moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0 if name == "c" else 0.1 * (i + 1))
        (moelora.inject_adapter(model, cfg, adapter_name=name) if i == 0 else moelora.add_adapter(model, name, cfg))
    state = moelora.adapter_state(model)
    row_names = ("a", "b", "a", "c", "b", "d", "a")
    T, D = 7, 5
    plan = BatchPlan(None, row_names)
    plan.lengths = (5, 7, 3, 6)  # a, c and d shorter than T, b full length
    site = model.model.layers[0].self_attn.q_proj
    drops = {n: site.adapters[n].lora_dropout for n in names}
    model.train()
    cpu = torch.device("cpu")

    def seed_all():
        for i, name in enumerate(names):
            state.seed_dropout(name, 10 + i)

    seed_all()
    state.begin_forward(plan, None, 0)
    try:
        slots = tuple(plan.slot_names.index(n) for n in names)
        mp = plan.segment_maps(len(row_names), T, slots)
        counts = mp["counts"]
        assert counts == [row_names.count(n) * T for n in names]
        got, scales = _stacked_keeps(state, [(drops[n], n, c) for n, c in zip(names, counts)], mp, D, cpu)
        assert got.shape == (len(names), max(counts), D)
        seed_all()
        for p, (name, c) in enumerate(zip(names, counts)):
            rate = getattr(drops[name], "p", 0.0)
            if rate == 0.0:
                ref = torch.ones(c, D, dtype=torch.bool)
            else:
                ref = state.dropout_keep(name, (c, D), torch.bool, cpu, rate)
            assert torch.equal(got[p, :c], ref), name
            assert bool(got[p, c:].all())
            assert scales[p] == (1.0 if rate == 0.0 else 1.0 / (1.0 - rate))
    finally:
        state.end_forward()
    assert not bool(got[0].all()) and not bool(got[1].all())  # something was dropped


def _mixed_batch_step(recompute: bool, pack=None):
    from moelora.layers.dispatch import plain_mixture_backward

    with plain_mixture_backward(not recompute):
        if pack is None:
            return _mixed_batch_grads("llama", eager=False, seed=2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return _mixed_batch_grads("llama", eager=False, seed=2)


def test_mixed_mixlora_recompute_equals_the_plain_composition() -> None:
    """The virtual-expert mixture recomputed in backward (``_MixRecompute``, dropout masks drawn
    up front as bools) gives the plain composition's logits, aux losses and gradients (bitwise:
    the same ops on the same inputs, the same draws from each adapter's stream)."""
    logits, aux, grads = _mixed_batch_step(True)
    ref_logits, ref_aux, ref_grads = _mixed_batch_step(False)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for k in ref_aux:
        torch.testing.assert_close(aux[k], ref_aux[k], rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=0, msg=n)


def test_mixed_mixlora_training_saves_no_per_slot_tensors() -> None:
    """The mixed-batch MixLoRA mixture keeps no floating (N, K, F) tensor for backward (its
    dropout masks as bools only); the plain composition does (the check has teeth)."""
    F_ = 37  # make_tiny's FFN width; K = 2 (the batch's largest top-k)
    found = {True: [], False: []}
    for recompute in (True, False):
        def pack(t, out=found[recompute]):  # the forward's saves (not the recompute's, in backward)
            if (torch._C._current_graph_task_id() == -1 and t.is_floating_point() and t.dim() >= 3 and t.shape[-1] == F_ and t.shape[-2] == 2
                    and not isinstance(t, torch.nn.Parameter)):
                out.append(tuple(t.shape))
            return t
        _mixed_batch_step(recompute, pack)
    assert found[False], "the plain composition should save (N, K, F) tensors"
    assert not found[True], found[True]


@pytest.mark.gpu
def test_a_queued_job_starts_on_the_gpu_after_another_jobs_test(tmp_path: Path) -> None:
    """On a GPU trainer Lightning's teardown after a job's test moves the module to the CPU; the
    shared base must come back, so that the queued job (and the running ones) train on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = ["trainer=gpu", "trainer.precision=32-true", "test=true", "plot=false", "trainer.val_check_interval=1000"]
    cfgs = [compose_train_config([*FAST, "trainer.max_steps=3", *JOBS[j], *gpu], output_dir=tmp_path / j)
            for j in ("lora_r4", "mixlora_r8", "lora_r8")]
    res = train_concurrently(cfgs, max_concurrent_jobs=1, progress=False)
    assert [r["status"] for r in res] == ["finished"] * 3, [r.get("error") for r in res]
    assert all("test/acc" in r["metrics"] for r in res), res


def test_row_gather_backward_is_the_inverse_gather():
    """``adapted._RowGather`` (the segment gathers of the mixed training forms, whose backward is a
    gather by the inverse map instead of autograd's accumulating index_put): gradcheck in float64
    for both directions of a plan's maps (tokens -> per-adapter segments with padding, and back)."""
    from moelora.layers.adapted import _RowGather

    torch.manual_seed(0)
    N, P, n, D = 11, 3, 5, 4
    tok = torch.randint(0, P + 1, (N,))  # P: a token of no adapter here
    sel, inv = torch.full((P, n), N), torch.full((N,), P * n)
    for p in range(P):
        idx = (tok == p).nonzero().flatten()[:n]
        sel[p, : len(idx)] = idx
        inv[idx] = p * n + torch.arange(len(idx))
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RowGather.apply(t, sel, inv), (x,))
    y = torch.randn(P * n, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _RowGather.apply(t, inv, sel.reshape(-1)), (y,))


def test_mixture_recompute_off_holds_for_a_step_only_when_every_job_turns_it_off(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``module.mixture_recompute=false`` in the concurrent launcher: a shared step stores the
    mixture (no recompute) only when all its jobs ask for it; one job that keeps the default keeps
    the memory-safe recompute for the step."""
    from moelora.layers.mix_recompute import _MixRecompute

    calls = []
    real = _MixRecompute.apply
    monkeypatch.setattr(_MixRecompute, "apply", staticmethod(lambda *a: calls.append(1) or real(*a)))
    jobs = {"a": ["adapter=mixlora", "adapter.num_experts=4", "seed=1"],
            "b": ["adapter=mixlora", "adapter.num_experts=4", "seed=2"]}

    def run(where: str, flags: dict) -> int:
        calls.clear()
        cfgs = [compose_train_config([*FAST, *QUIET, "trainer.max_steps=2", *jobs[j],
                                      f"module.mixture_recompute={flags[j]}"], output_dir=tmp_path / where / j)
                for j in jobs]
        res = train_concurrently(cfgs, progress=False)
        assert [r["status"] for r in res] == ["finished", "finished"], res
        return len(calls)

    assert run("off", {"a": "false", "b": "false"}) == 0
    assert run("one_on", {"a": "false", "b": "true"}) > 0
