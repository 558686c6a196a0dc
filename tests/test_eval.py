"""Accuracy evaluation: lm-eval model `moelora`, task folders, fast multiple choice, moelora-eval."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moelora
import moelora.eval  # registers the lm-eval model `moelora`
from moelora.eval import task_hooks, tasks
from moelora.eval.harness import MoeLoraLM, evaluate
from moelora.models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false"}
TASKS = ["moelora_synthetic_add", "moelora_synthetic_mcq"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: two intra-op threads spin against each other and make tiny models 10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A MixLoRA adapter with random (non-zero) weights for load_base_model("tiny")."""
    model = build_tiny_model()
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if moelora.inject.is_adapter_parameter(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return moelora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> tasks.TaskDir:
    return tasks.write_task_dir(tmp_path_factory.mktemp("tasks"), ["synthetic:add,mcq,classify"], n_test=24)


@pytest.fixture(scope="module")
def python_run(adapter_dir, task_dir):
    lm = MoeLoraLM(pretrained="tiny", adapter=str(adapter_dir), dtype="float32", device="cpu", batch_size=8)
    res = evaluate(lm, TASKS, include_paths=[task_dir.path], limit=6, mc_modes=("loglikelihood", "fast"))
    return lm, res


# ---- task folders -----------------------------------------------------------------------------
def test_task_dir_has_absolute_paths_and_moelora_documents(task_dir):
    assert task_dir.groups == {"moelora_synthetic": ["moelora_synthetic_add", "moelora_synthetic_mcq",
                                                     "moelora_synthetic_classify"]}
    text = (task_dir.path / "moelora_synthetic_mcq.yaml").read_text()
    assert f'test: "{task_dir.path}/moelora_synthetic_mcq.test.jsonl"' in text
    assert "output_type: multiple_choice" in text
    assert "output_type: generate_until" in (task_dir.path / "moelora_synthetic_add.yaml").read_text()
    doc = json.loads((task_dir.path / "moelora_synthetic_mcq.test.jsonl").read_text().splitlines()[0])
    assert set(doc) == {"task", "prompt", "target", "choices", "label", "mc_choices"}
    assert doc["mc_choices"] == ["A", "B", "C", "D"]
    assert (task_dir.path / "moelora_hooks.py").is_file()


def test_mc_continuations_keep_the_shared_answer_prefix():
    ex = {"task": "arc_easy", "prompt": "Q?\n", "target": "the correct answer is answer2",
          "choices": ["answer1", "answer2"], "label": 1}
    assert task_hooks.mc_continuations(ex) == ["the correct answer is answer1", "the correct answer is answer2"]
    assert task_hooks.mc_continuations({**ex, "choices": None, "label": None}) is None


def test_bundled_hub_tasks_are_current(tmp_path):
    tasks.write_hub_task_dir(tmp_path)
    for f in tmp_path.iterdir():
        assert (tasks.HUB_TASK_DIR / f.name).read_text() == f.read_text(), f"regenerate {f.name}: write_hub_task_dir()"


def test_hub_hooks_and_local_files_read_the_hub_schema(tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(FIXTURES / "arc_easy.jsonl"), split="train")
    docs = task_hooks.process_arc_easy(ds)
    assert set(docs.column_names) == {"task", "prompt", "target", "choices", "label", "mc_choices"}
    assert docs[0]["mc_choices"][docs[0]["label"]] == docs[0]["target"]
    written = tasks.write_task_dir(tmp_path, [f"arc_easy={FIXTURES / 'arc_easy.jsonl'}", f"obqa={FIXTURES / 'openbookqa.jsonl'}"])
    assert written.tasks == ["moelora_arc_easy", "moelora_openbookqa"]
    resolved = tasks.resolve_sources(["commonsense", "piqa", "lm_eval:hellaswag"], tmp_path / "x")
    assert resolved.names == ["moelora_commonsense", "moelora_piqa", "hellaswag"] and resolved.include_defaults


# ---- lm-eval ----------------------------------------------------------------------------------
def test_lm_eval_cli_and_python_agree(adapter_dir, task_dir, python_run, tmp_path):
    """`python -m moelora.eval.lm_eval --model moelora ...` gives the numbers of evaluate()."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moelora.eval.lm_eval", "--model", "moelora",
           "--model_args", f"pretrained=tiny,adapter={adapter_dir},dtype=float32",
           "--tasks", ",".join(TASKS), "--include_path", str(task_dir.path), "--output_path", str(out),
           "--device", "cpu", "--batch_size", "8", "--limit", "6"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    cli = json.loads(result_file.read_text())["results"]
    _, res = python_run
    for task in TASKS:
        assert cli[task]["acc,none"] == pytest.approx(res["metrics"][f"acc/{task}"], abs=1e-9)
    assert res["metrics"]["n/moelora_synthetic_mcq"] == 6


def test_fast_multiple_choice_agrees_with_loglikelihood_on_single_token_choices(python_run):
    """mcq choices are one token each (A-D): label-logit argmax == log-likelihood argmax."""
    _, res = python_run
    fast = res["fast_mc"]["moelora_synthetic_mcq"]
    assert fast["exact"] == fast["n"] == 6 and fast["fallback"] == 0
    assert res["metrics"]["fast_acc/moelora_synthetic_mcq"] == res["metrics"]["acc/moelora_synthetic_mcq"]
    assert "fast_acc/moelora_synthetic_add" not in res["metrics"]  # generation tasks have no choices


def test_moelora_lm_supports_all_request_types(python_run):
    from lm_eval.api.instance import Instance

    lm, _ = python_run
    ll = lm.loglikelihood([Instance("loglikelihood", {}, ("add 1+2=", "3"), 0)], disable_tqdm=True)
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("rev abc=cba",), 0)], disable_tqdm=True)
    gen = lm.generate_until([Instance("generate_until", {}, ("add 1+2=", {"until": ["\n"], "max_gen_toks": 4}), 0)],
                            disable_tqdm=True)
    assert ll[0][0] < 0 and roll[0] < 0 and isinstance(gen[0], str)
    assert lm.get_model_info()["adapter_method"] == "mixlora"


def test_pretrained_can_be_a_training_run_directory(adapter_dir, tmp_path):
    """lm-eval's `pretrained=<moelora-train run dir>` rebuilds the run's base model from its
    .hydra/config.yaml and takes <run>/adapter."""
    import shutil

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "seed: 3\nmodel:\n  _target_: moelora.models.load_base_model\n  name_or_path: tiny\n")
    shutil.copytree(adapter_dir, tmp_path / "adapter")
    lm = MoeLoraLM(pretrained=str(tmp_path), dtype="float32", device="cpu")
    assert lm.adapter_path == str(tmp_path / "adapter")
    assert moelora.get_adapter_config(lm.model).method == "mixlora"


# ---- moelora-eval (Hydra) ---------------------------------------------------------------------
def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_moelora_eval_writes_report_and_routing(adapter_dir, tmp_path):
    from moelora.eval.cli import evaluate_from_config

    cfg = _compose("eval", ["model=hf", "model.name_or_path=tiny", f"adapter_dir={adapter_dir}", "tasks=[synthetic:mcq+classify]", "limit=4",
                            "mc_modes=[loglikelihood,fast]", "batch_size=8", "device=cpu",
                            f"paths.output_dir={tmp_path}"])
    metrics, _ = evaluate_from_config(cfg)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["metrics"]["test/acc/moelora_synthetic_mcq"] == metrics["acc/moelora_synthetic_mcq"]
    assert "test/fast_acc/moelora_synthetic_classify" in res["metrics"]
    assert res["trainable_params"]["trainable"] > 0 and res["method"] == "mixlora"
    assert res["versions"]["lm_eval"] and res["config"]["tasks"] == ["synthetic:mcq+classify"]
    md = (tmp_path / "results.md").read_text()
    assert "| task | acc | acc_norm | fast_acc |" in md and "moelora_synthetic_mcq (n=4)" in md
    routing = json.loads((tmp_path / "routing.json").read_text())
    assert routing["tasks"] == ["moelora_synthetic_mcq", "moelora_synthetic_classify"]
    assert (tmp_path / "routing_load.csv").is_file() and (tmp_path / "lm_eval_results.json").is_file()


# ---- bad inputs -------------------------------------------------------------------------------
def test_missing_adapter_dir_fails_clearly(tmp_path):
    with pytest.raises(moelora.AdapterFileError, match="does not exist"):
        MoeLoraLM(pretrained="tiny", adapter=str(tmp_path / "nope"), device="cpu")


def test_adapter_of_another_base_model_fails_clearly(adapter_dir):
    with pytest.raises(moelora.AdapterFileError, match="another base model"):
        MoeLoraLM(pretrained="tiny_qwen2", adapter=str(adapter_dir), device="cpu")


def test_unknown_task_fails_clearly(python_run, task_dir, tmp_path):
    lm, _ = python_run
    with pytest.raises(tasks.UnknownTaskError, match="moelora_synthetic_mcq"):
        evaluate(lm, ["moelora_synthetic_nope"], include_paths=[task_dir.path])
    with pytest.raises(tasks.UnknownTaskError, match="unknown task source 'arithmetic'"):
        tasks.resolve_sources(["arithmetic"], tmp_path)
    with pytest.raises(tasks.UnknownTaskError, match="unknown synthetic task"):
        tasks.write_task_dir(tmp_path, ["synthetic:addition"])


def test_moelora_eval_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moelora.eval.cli", "tasks=[arithmetic]", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "moelora-eval: error: unknown task source 'arithmetic'" in proc.stderr
