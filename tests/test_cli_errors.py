"""moelora-train's answers to bad input (issue 15): one line ``moelora-train: error: ...`` and exit
code 2 for wrong-typed values, unknown groups, unusable checkpoints and unwritable log folders; a
sweep that outlives a bad job; Ctrl-C that leaves results.json, the adapter and a resume command.

The CLI runs in-process (``moelora.cli.train_main`` with ``sys.argv`` set): the same code path
as the console script, without a Python start per case."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import moelora
from moelora import cli
from moelora.cli import ConfigError, compose_train_config, train

FAST = [
    "model.hidden_size=32", "model.intermediate_size=64",
    "data.n_train=8", "data.n_val=2", "data.n_test=2", "data.batch_size=8", "data.eval_batch_size=16",
    "callbacks.progress_bar.refresh_rate=0", "module.router_stats_every_n_steps=0", "plot=false",
]


def run_cli(monkeypatch, capsys, *args: str, run_dir: Path | None = None) -> tuple[int, str, str]:
    """``moelora-train *args`` in this process: (exit code, stdout, stderr)."""
    argv = ["moelora-train", *args]
    if run_dir is not None:
        argv.append(f"hydra.run.dir={run_dir}")
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("MOELORA_DEBUG", raising=False)
    try:
        cli.train_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [ln for ln in stderr.splitlines() if ln.startswith("moelora-train: error:")]


# ---- 1. values of the wrong type: one line naming key, value and what is expected ----------
BAD_TYPES = {
    "max_steps_not_int": ("trainer.max_steps=abc", ["trainer.max_steps", "'abc'", "integer"]),
    "lr_not_number": ("module.optimizer.lr=abc", ["module.optimizer.lr", "'abc'", "number > 0"]),
    "lr_zero": ("module.optimizer.lr=0", ["module.optimizer.lr=0", "number > 0"]),
    "negative_batch": ("data.batch_size=-4", ["data.batch_size=-4", "integer >= 1"]),
    "zero_eval_batch": ("data.eval_batch_size=0", ["data.eval_batch_size=0", "integer >= 1"]),
    "bool_experts": ("adapter.num_experts=True", ["num_experts=True", "integer"]),
    "unknown_adapter_group": ("adapter=nope", ["adapter/nope", "lora", "mixlora", "lora_switch"]),
    "unknown_schedule": ("module.scheduler.name=cosin", ["module.scheduler.name='cosin'", "cosine | linear"]),
    "bad_override_syntax": ("trainer.max_steps=[1", ["trainer.max_steps=[1"]),
    "null_group": ("adapter=null", ["Config group override"]),
    "bad_interpolation": ("seed=${nope}", ["nope"]),
    "unknown_trainer_key": ("+trainer.foo=1", ["trainer.foo=1", "takes no argument 'foo'"]),
    "trainer_key_typo": ("+trainer.max_step=5", ["trainer.max_step=5", "did you mean trainer.max_steps?"]),
    "optimizer_key_typo": ("+module.optimizer.learning_rate=1", ["module.optimizer.learning_rate", "AdamW"]),
    "compiled_hidden_not_bool": ("module.compiled_expert_hidden=maybe", ["module.compiled_expert_hidden='maybe'",
                                                                          "true or false"]),
    "recompute_not_bool": ("module.mixture_recompute=sometimes", ["module.mixture_recompute='sometimes'",
                                                                   "true or false"]),
}


@pytest.mark.parametrize("case", list(BAD_TYPES))
def test_wrong_value_is_one_line_with_exit_code_2(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    override, expected = BAD_TYPES[case]
    # the model path does not exist: the error must come before any model is loaded
    code, _, err = run_cli(monkeypatch, capsys, "model=hf", "model.name_or_path=/nonexistent/model", override,
                           run_dir=tmp_path / "run")
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "nonexistent/model" not in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_mandatory_value_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "model=hf", run_dir=tmp_path / "run")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "model.name_or_path has no value" in lines[0], err[-3000:]


def test_valid_values_pass_the_checks(tmp_path: Path) -> None:
    from moelora.training.validate import check_config_values

    cfg = compose_train_config(["trainer.val_check_interval=0.5", "module.optimizer.lr=1", "seed=null",
                                "data.n_train=null", "trainer.gradient_clip_val=null"], output_dir=tmp_path)
    from omegaconf import OmegaConf

    check_config_values(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                               resolve=True))


# ---- 2. resume from a corrupted or mismatched checkpoint ------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train(compose_train_config([*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false",
                                "save_adapter=false", "callbacks.model_checkpoint.every_n_train_steps=2"],
                               output_dir=out))
    path = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["moelora_base"] == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                    "vocab_size": ckpt["moelora_base"]["vocab_size"]}
    return path


def _corrupt(kind: str, good: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """(bad checkpoint, extra overrides, texts the error must contain)"""
    data = good.read_bytes()
    bad = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        return bad, [], ["truncated or corrupted"]
    if kind == "garbage":
        bad.write_bytes(os.urandom(4096))
        return bad, [], ["truncated or corrupted"]
    if kind == "empty":
        bad.write_bytes(b"")
        return bad, [], ["is empty"]
    if kind == "not_a_checkpoint":
        torch.save({"weights": torch.zeros(2)}, bad)
        return bad, [], ["not a moelora-train"]
    if kind == "other_base_size":
        bad.write_bytes(data)
        return bad, ["model.hidden_size=48"], ["another base model", "hidden_size=32 in the checkpoint but 48 now"]
    if kind == "other_base_no_signature":  # a checkpoint from before the signature: the shapes decide
        ckpt = torch.load(good, map_location="cpu", weights_only=True)
        del ckpt["moelora_base"]
        torch.save(ckpt, bad)
        return bad, ["model.hidden_size=48"], ["has shape", "another base model size"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "not_a_checkpoint", "other_base_size",
                                  "other_base_no_signature"])
def test_resume_from_a_bad_checkpoint_is_one_line(kind: str, checkpoint: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    bad, extra, expected = _corrupt(kind, checkpoint, tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *FAST, *extra, f"ckpt_path={bad}", run_dir=tmp_path / "run")
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and str(bad) in lines[0], err[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- 3. a log directory that cannot be written ----------------------------------------------
def test_log_dir_that_is_a_file_names_the_setting(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MOELORA_LOG_DIR", str(blocker))
    code, _, err = run_cli(monkeypatch, capsys, *FAST)
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and str(blocker) in lines[0] and "MOELORA_LOG_DIR" in lines[0]
    assert "hydra.run.dir" in lines[0]


def test_read_only_working_directory_names_the_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    # The tests run as root, for whom chmod does not make a folder read-only: refuse writes below
    # `ro` the way a read-only folder does (EACCES from mkdir).
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(ro) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    monkeypatch.chdir(ro)
    monkeypatch.delenv("MOELORA_LOG_DIR", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, *FAST)
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and f"{ro}{os.sep}logs" in lines[0] and "Permission denied" in lines[0]
    assert "MOELORA_LOG_DIR=" in lines[0]


# ---- 4. a sweep with one invalid job --------------------------------------------------------
def test_sweep_runs_the_other_jobs_and_lists_the_failed_one(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    code, out, err = run_cli(monkeypatch, capsys, "-m", "adapter=lora", "adapter.r=0,2", *FAST,
                             "trainer.max_steps=1", "trainer.val_check_interval=1", "test=false",
                             "save_adapter=false", f"hydra.sweep.dir={sweep}")
    assert code == 2, err[-3000:]
    assert "r must be a positive integer" in err
    failed = json.loads((sweep / "0" / "results.json").read_text())
    assert failed["status"] == "failed" and "r must be a positive integer" in failed["error"]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "finished"
    import pandas as pd

    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["job"]) == [0, 1] and list(summary["status"]) == ["failed", "finished"]
    assert "r must be a positive integer" in summary["error"][0] and pd.isna(summary["error"][1])
    md = (sweep / "summary.md").read_text()
    assert "| failed |" in md and "r must be a positive integer" in md
    assert "Sweep summary" in out


def test_sweep_with_an_unknown_group_option_stops_before_any_job(tmp_path: Path, monkeypatch, capsys) -> None:
    # a typo in a group name is found when Hydra composes every job's config, before the first runs
    sweep = tmp_path / "sweep"
    code, _, err = run_cli(monkeypatch, capsys, "-m", "adapter=lora,nope", *FAST, f"hydra.sweep.dir={sweep}")
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "adapter/nope" in lines[0]
    assert not list(sweep.glob("*/results.json"))


class FailAtStart(pl.Callback):
    """A crash inside training (not a config error) when ``fail`` is set."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def on_train_start(self, trainer, pl_module) -> None:
        if self.fail:
            raise RuntimeError("boom in the training loop")


def test_sweep_outlives_a_crashed_job_and_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    code, out, err = run_cli(monkeypatch, capsys, "-m", f"+callbacks.fail._target_={__name__}.FailAtStart",
                             "+callbacks.fail.fail=true,false", "adapter=lora", *FAST, "trainer.max_steps=1",
                             "trainer.val_check_interval=1", "test=false", "save_adapter=false",
                             f"hydra.sweep.dir={sweep}")
    assert code == 1
    import pandas as pd

    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["status"]) == ["failed", "finished"]
    assert summary["error"][0] == "RuntimeError: boom in the training loop"


# ---- 5. Ctrl-C during training --------------------------------------------------------------
class InterruptAtStep(pl.Callback):
    """Ctrl-C when optimizer step ``step`` is about to run: a real SIGINT to this process, or
    (``raw``) a KeyboardInterrupt raised in the loop, as a second Ctrl-C would."""

    def __init__(self, step: int, raw: bool = False) -> None:
        self.step, self.raw, self.sent = step, raw, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            if self.raw:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)


INTERRUPT = [f"+callbacks.interrupt._target_={__name__}.InterruptAtStep", "+callbacks.interrupt.step=3"]
SHORT = [*FAST, "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "callbacks.model_checkpoint.every_n_train_steps=2"]


def test_ctrl_c_stops_after_the_step_with_results_adapter_and_resume_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    metrics, objects = train(compose_train_config([*SHORT, *INTERRUPT], output_dir=run))
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again afterwards
    assert objects["interrupted"] and objects["trainer"].global_step == 4  # the step under way finished
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "interrupted" and results["global_step"] == 4
    assert (run / "adapter" / "adapter_config.json").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
    assert results["resume_command"].startswith("moelora-train ") and f"ckpt_path={ckpt}" in results["resume_command"]
    assert not any(k.startswith("test/") for k in results["metrics"])  # no final test of a stopped run
    # the resume command's checkpoint continues the run to its end, where the uninterrupted run ends
    _, resumed = train(compose_train_config([*SHORT, f"ckpt_path={ckpt}", "test=false"], output_dir=tmp_path / "r"))
    assert resumed["trainer"].global_step == 6 and not resumed["interrupted"]
    _, full = train(compose_train_config([*SHORT, "test=false"], output_dir=tmp_path / "full"))
    full_adapter, resumed_adapter = (moelora.adapter_state_dict(o["model"]) for o in (full, resumed))
    for k, v in full_adapter.items():
        torch.testing.assert_close(resumed_adapter[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_keyboard_interrupt_in_the_loop_still_writes_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    _, objects = train(compose_train_config([*SHORT, *INTERRUPT, "+callbacks.interrupt.raw=true"], output_dir=run))
    assert signal.getsignal(signal.SIGINT) is handler
    assert objects["interrupted"] and objects["trainer"].global_step == 3
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "interrupted" and results["global_step"] == 3
    assert (run / "adapter" / "adapter_config.json").is_file()
    # the resume point is the last periodic checkpoint (step 2): the interrupted step may be torn
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in results["resume_command"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2


def test_cli_exits_130_after_ctrl_c_and_prints_the_resume_command(tmp_path: Path, monkeypatch, capsys) -> None:
    code, out, err = run_cli(monkeypatch, capsys, *SHORT, *INTERRUPT, "test=false", run_dir=tmp_path / "run")
    assert code == 130, err[-3000:]
    assert "Resume with: moelora-train" in out and "ckpt_path=" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "interrupted"


def test_config_error_is_still_a_config_error_in_process(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.max_steps='abc'"):
        train(compose_train_config(["trainer.max_steps=abc"], output_dir=tmp_path / "run"))


def test_ctrl_c_stops_a_sweep_with_a_summary_of_the_jobs_so_far(tmp_path: Path, monkeypatch, capsys) -> None:
    sweep = tmp_path / "sweep"
    code, out, err = run_cli(monkeypatch, capsys, "-m", "seed=1,2", *SHORT, *INTERRUPT, "test=false",
                             "save_adapter=false", f"hydra.sweep.dir={sweep}")
    assert code == 130, err[-3000:]
    assert json.loads((sweep / "0" / "results.json").read_text())["status"] == "interrupted"
    assert not (sweep / "1").exists()  # the sweep stopped
    assert "interrupted" in (sweep / "summary.md").read_text() and "Sweep summary" in out
