"""moelora-train: short real runs of train(cfg) on the tiny model, the loss masks, config errors
that must fail before training, the CLI's exit code and a 2-job sweep's summary table."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelora
from moelora.cli import ConfigError, compose_train_config, train
from moelora.data import IGNORE_INDEX, encode_example
from moelora.training.tiny import tiny_llama

# A smaller tiny model and data: every test here trains for seconds.
FAST_MODEL = ["model.hidden_size=32", "model.intermediate_size=64"]
FAST = [
    *FAST_MODEL,
    "data.n_train=24", "data.n_val=2", "data.n_test=2", "data.batch_size=8", "data.eval_batch_size=16",
    "callbacks.progress_bar.refresh_rate=0", "module.router_stats_every_n_steps=1",
]
REPO = Path(__file__).resolve().parents[1]


def run_train(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    cfg = compose_train_config([*FAST, *overrides], output_dir=tmp_path / "run")
    return train(cfg)


@pytest.mark.parametrize("method", ["lora", "mixlora", "lora_switch"])
def test_fast_dev_run_trains_every_method(method: str, tmp_path: Path) -> None:
    metrics, objects = run_train(tmp_path, f"adapter={method}", "trainer.fast_dev_run=2")
    assert objects["trainer"].global_step == 2
    for key in ("train/loss", "val/loss", "test/loss"):
        assert math.isfinite(metrics[key]), key
    if method != "lora":
        assert metrics["train/aux_loss"] > 0  # the router load-balance loss is in the objective
    # two optimizer steps moved the zero-initialised B factors away from zero
    lora_b = [v for k, v in moelora.adapter_state_dict(objects["model"]).items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)


def test_short_run_writes_the_run_directory(tmp_path: Path) -> None:
    metrics, objects = run_train(
        tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 4 and results["method"] == "mixlora" and results["seed"] == 1234
    assert results["trainable_params"]["trainable"] == moelora.trainable_parameters(objects["model"])["trainable"]
    assert set(results["versions"]) >= {"torch", "transformers", "pytorch_lightning", "moelora"}
    tasks = objects["datamodule"].task_names
    assert {f"test/acc/{t}" for t in tasks} <= set(results["metrics"]) and "val/loss" in results["metrics"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss", "train/aux_loss", "train/lr", "val/loss", "router/load_cv",
                "router/layer00/load_e0", "router/layer01/entropy", "router/experts_per_token", *(f"val/acc/{t}" for t in tasks)):
        assert col in header, col
    assert (run / "curves.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # the saved adapter reproduces the trained model's outputs on a fresh base
    base, tok = tiny_llama(hidden_size=32, intermediate_size=64)
    loaded = moelora.load_adapter(base, run / "adapter").eval()
    trained = objects["model"].eval()
    ids = tok(["add 1+2="], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)


def test_loss_is_masked_to_answer_tokens(tmp_path: Path) -> None:
    """Prompt and padding tokens contribute nothing: their labels are -100, the loss gradient
    w.r.t. their logits is zero, and extra padding changes neither the CE nor the aux loss."""
    _, objects = run_train(tmp_path, "trainer.fast_dev_run=1", "test=false")
    dm, model, tok = objects["datamodule"], objects["model"].eval(), objects["module"].tokenizer
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i, ex in enumerate(batch["examples"]):
        enc = encode_example(tok, ex, dm.max_length)
        n_prompt = enc["labels"].count(IGNORE_INDEX)
        n_target = len(enc["input_ids"]) - n_prompt
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all()  # prompt (and BOS)
        assert (labels[i, n_prompt : n_prompt + n_target] == ids[i, n_prompt : n_prompt + n_target]).all()
        assert (labels[i, n_prompt + n_target :] == IGNORE_INDEX).all()  # padding
        assert (mask[i, n_prompt + n_target :] == 0).all()

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    logits = out.logits
    logits.retain_grad()
    (out.loss - out.aux_loss).backward()  # the CE part
    # logits at t predict token t+1: zero gradient wherever label t+1 is masked
    masked_next = torch.cat([labels[:, 1:] == IGNORE_INDEX, torch.ones_like(labels[:, :1], dtype=torch.bool)], 1)
    assert logits.grad[masked_next].abs().max() == 0
    assert (logits.grad[~masked_next].abs().sum(-1) > 0).all()

    with torch.no_grad():
        pad = torch.full((ids.shape[0], 5), tok.pad_token_id)
        more = model(input_ids=torch.cat([ids, pad], 1), attention_mask=torch.cat([mask, 0 * pad], 1),
                     labels=torch.cat([labels, IGNORE_INDEX + 0 * pad], 1))
        torch.testing.assert_close(more.loss, out.loss.detach())
        torch.testing.assert_close(more.aux_loss, out.aux_loss.detach())
        # a changed answer token changes the loss; a changed prompt label (-> -100 anyway) cannot exist
        flipped = labels.clone()
        i, t = (labels != IGNORE_INDEX).nonzero()[0].tolist()
        flipped[i, t] = (labels[i, t] + 1) % model.config.vocab_size
        assert not torch.isclose(model(input_ids=ids, attention_mask=mask, labels=flipped).loss, out.loss.detach())


BAD_VALUES = {
    "unknown_method": (["adapter.method=nope"], "unknown adapter method 'nope'"),
    "top_k_gt_experts": (["adapter.top_k=9"], "top_k must be an integer in [1, num_experts=8]"),
    "rank_zero": (["adapter.r=0"], "r must be a positive integer"),
    "missing_data_file": (["data=file", "data.source=/nonexistent/train.jsonl"], "/nonexistent/train.jsonl"),
    "unknown_task": (["data.tasks=[add,nope]"], "unknown synthetic task(s) ['nope']"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_fails_before_training(case: str, tmp_path: Path) -> None:
    overrides, message = BAD_VALUES[case]
    # The model path does not exist either: the config error must be found before the model loads.
    fast = [o for o in FAST if o not in FAST_MODEL]
    cfg = compose_train_config([*fast, "model=hf", "model.name_or_path=/nonexistent/model", *overrides],
                               output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert "nonexistent/model" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOELORA_LOG_DIR": str(cwd / "logs"), "HF_HUB_OFFLINE": "1"}
    env.pop("MOELORA_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "moelora.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_reports_a_bad_value_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    proc = _cli("adapter.top_k=9", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("moelora-train: error:")]
    assert len(errors) == 1 and "top_k" in errors[0]
    assert "Traceback" not in proc.stderr


def test_multirun_writes_a_summary_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _cli("-m", "adapter=lora,mixlora", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("job,overrides,method,trainable_params")
    assert {r.split(",")[2] for r in rows[1:]} == {"lora", "mixlora"}
    md = (sweep / "summary.md").read_text()
    assert "| job | overrides |" in md and "adapter=lora" in md
    for job in ("0", "1"):
        assert (sweep / job / ".hydra" / "config.yaml").is_file()
        assert (sweep / job / "results.json").is_file()
    assert "Sweep summary" in proc.stdout


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays(name: str) -> None:
    from moelora.training.schedules import lr_multiplier

    f = [lr_multiplier(s, total_steps=100, name=name, warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup, never 0
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:10]))
    if name == "constant":
        assert f[10:] == [1.0] * 91
    else:
        assert f[100] == pytest.approx(0.1) and all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))
        assert f[55] == pytest.approx(0.55)  # midpoint of the decay: cosine and linear agree


def test_gradient_accumulation_and_clipping(tmp_path: Path) -> None:
    _, objects = run_train(tmp_path, "trainer.max_steps=2", "trainer.accumulate_grad_batches=2",
                           "trainer.gradient_clip_val=0.5", "trainer.val_check_interval=4", "test=false")
    trainer = objects["trainer"]
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4  # 2 micro-batches per step
    assert trainer.gradient_clip_val == 0.5


def test_mixture_recompute_off_trains_the_same_adapter_without_the_recompute(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``module.mixture_recompute=false``: MixLoRA's forwards take the stored (plain) mixture, never
    the recomputing one, and the trained adapter equals the default (recomputing) run's (fp32)."""
    from safetensors.torch import load_file

    from moelora.layers.mix_recompute import _MixRecompute

    calls = []
    real = _MixRecompute.apply
    monkeypatch.setattr(_MixRecompute, "apply", staticmethod(lambda *a: calls.append(1) or real(*a)))
    common = ["adapter=mixlora", "trainer.max_steps=3", "test=false", "plot=false",
              "trainer.val_check_interval=1000", "module.router_stats_every_n_steps=0"]
    adapters, counts = {}, {}
    for flag in ("true", "false"):
        calls.clear()
        cfg = compose_train_config([*FAST, *common, f"module.mixture_recompute={flag}"], output_dir=tmp_path / flag)
        train(cfg)
        counts[flag] = len(calls)
        adapters[flag] = load_file(str(tmp_path / flag / "adapter" / "adapter_model.safetensors"))
    assert counts["true"] > 0 and counts["false"] == 0
    for k, v in adapters["true"].items():
        torch.testing.assert_close(adapters["false"][k], v, atol=1e-5, rtol=1e-4, msg=k)


def test_compiled_expert_hidden_trains_as_the_eager_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``module.compiled_expert_hidden=true``: MixLoRA's forwards and backward recomputes take the
    compiled hidden (CPU Inductor) and the trained adapter equals the eager run's (fp32)."""
    from safetensors.torch import load_file

    from moelora.layers import mixture_hidden

    calls = []
    real = mixture_hidden.compiled_hidden
    monkeypatch.setattr(mixture_hidden, "compiled_hidden", lambda *a: calls.append(1) or real(*a))
    common = ["adapter=mixlora", "+adapter.expert_backend=fused", "trainer.max_steps=3", "test=false", "plot=false",
              "trainer.val_check_interval=1000", "module.router_stats_every_n_steps=0"]
    adapters = {}
    for flag in ("false", "true"):
        cfg = compose_train_config([*FAST, *common, f"module.compiled_expert_hidden={flag}"],
                                   output_dir=tmp_path / flag)
        train(cfg)
        adapters[flag] = load_file(str(tmp_path / flag / "adapter" / "adapter_model.safetensors"))
        if flag == "false":
            assert not calls
    layers = tiny_llama(**{k.split(".")[1]: int(v) for k, v in (o.split("=") for o in FAST_MODEL)})[0].config.num_hidden_layers
    assert len(calls) == 2 * 3 * layers  # forward + recompute, every layer, every step
    for k, v in adapters["false"].items():
        torch.testing.assert_close(adapters["true"][k], v, atol=1e-5, rtol=1e-4, msg=k)
