"""Checkpoints hold the adapter and optimizer state only, are written atomically, and a run
killed mid-epoch and resumed ends exactly where the uninterrupted run ends."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

import moelora
from moelora.cli import ConfigError, compose_train_config, train

# 5 tasks x 8 rows / batch 8 = 5 batches per epoch: 12 steps cross two epoch boundaries, and the
# checkpoint at step 8 sits in the middle of the second epoch.
STEPS, CKPT_EVERY, KILL_AT = 12, 4, 10
COMMON = [
    "model.hidden_size=32", "model.intermediate_size=64",
    "data.n_train=8", "data.n_val=2", "data.n_test=2", "data.batch_size=8", "data.eval_batch_size=16",
    "callbacks.progress_bar.refresh_rate=0", "trainer.log_every_n_steps=1",
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4",
    f"callbacks.model_checkpoint.every_n_train_steps={CKPT_EVERY}",
    # randomness that a resume must reproduce: LoRA dropout and router jitter draw from torch's RNG
    "adapter.lora_dropout=0.1", "adapter.jitter_noise=0.1", "module.scheduler.name=cosine",
    "save_adapter=false", "plot=false",
]


class Killed(RuntimeError):
    """Stands for SIGKILL: the process stops after its last checkpoint, saving nothing more."""


class KillAtStep(pl.Callback):
    """Raises when optimizer step ``step`` is about to run (checkpoints of earlier steps exist)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Killed(f"killed before step {self.step + 1}")


KILL = [f"+callbacks.kill._target_={__name__}.KillAtStep", f"+callbacks.kill.step={KILL_AT}"]


def _train(out: Path, *overrides: str) -> tuple[dict, dict]:
    return train(compose_train_config([*COMMON, *overrides], output_dir=out))


def _adapter(objects: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in moelora.adapter_state_dict(objects["model"]).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics, objects = _train(tmp_path_factory.mktemp("full") / "run")
    assert objects["trainer"].global_step == STEPS
    return metrics, _adapter(objects)


@pytest.mark.parametrize("method", ["mixlora"])
def test_killed_and_resumed_run_matches_the_uninterrupted_run(method, uninterrupted, tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        _train(killed_dir, *KILL)
    last = killed_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8  # the checkpoint before the kill, mid-epoch (batch 3 of epoch 1)
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1

    metrics, objects = _train(tmp_path / "resumed", f"ckpt_path={last}")
    assert objects["trainer"].global_step == STEPS
    full_metrics, full_adapter = uninterrupted
    resumed_adapter = _adapter(objects)
    assert resumed_adapter.keys() == full_adapter.keys()
    for k, v in full_adapter.items():
        torch.testing.assert_close(resumed_adapter[k], v, rtol=1e-5, atol=1e-7, msg=k)
    for key in ("val/loss", "test/loss", "test/acc"):
        assert metrics[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-7), key


def test_resume_true_continues_in_place_and_keeps_the_metrics(uninterrupted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(Killed):
        _train(run, *KILL)
    metrics, _ = _train(run, "resume=true")
    assert metrics["test/loss"] == pytest.approx(uninterrupted[0]["test/loss"], rel=1e-5)
    steps = pd.read_csv(run / "metrics.csv")["step"]
    assert steps.min() < 8 < steps.max()  # rows from before the kill and after the resume
    assert not list(run.glob("metrics.before_resume*"))
    assert json.loads((run / "results.json").read_text())["global_step"] == STEPS


def test_checkpoint_holds_only_adapter_and_optimizer_state(tmp_path: Path) -> None:
    _, objects = _train(tmp_path / "run", "trainer.max_steps=4")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]  # no temp files left behind
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    adapter = moelora.adapter_state_dict(objects["model"])
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in adapter}  # no frozen base tensor
    n_adapter = sum(v.numel() for v in adapter.values())
    n_saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_saved == n_adapter < moelora.trainable_parameters(objects["model"])["total"]
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(adapter) and all("exp_avg" in s for s in state.values())
    assert "torch" in ckpt["moelora_rng"] and ckpt["moelora_adapter_config"]["method"] == "mixlora"


def test_resume_with_a_different_adapter_is_a_config_error(tmp_path: Path) -> None:
    _train(tmp_path / "run", "trainer.max_steps=4")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="different adapter config"):
        _train(tmp_path / "other", f"ckpt_path={last}", "adapter.r=4")
    with pytest.raises(ConfigError, match="does not exist"):
        _train(tmp_path / "other", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ConfigError, match="no checkpoint"):
        _train(tmp_path / "fresh", "resume=true")


def test_module_load_state_dict_is_strict(tmp_path: Path) -> None:
    _, objects = _train(tmp_path / "run", "trainer.fast_dev_run=1", "test=false")
    module = objects["module"]
    sd = module.state_dict()
    module.load_state_dict(sd)  # round trip
    with pytest.raises(KeyError):
        module.load_state_dict({k: v for i, (k, v) in enumerate(sd.items()) if i})  # one missing
    with pytest.raises(KeyError):
        module.load_state_dict({**sd, "model.model.embed_tokens.weight": torch.zeros(1)})
