"""Command-line entry point ``moelora-train``: the only code that sees Hydra's DictConfig.

``train(cfg)`` instantiates typed objects from the composed config, trains, evaluates and writes
the run directory; it returns ``(metrics, objects)`` so tests can call it after ``compose()``.
``train_main`` is the ``@hydra.main`` wrapper that turns our config errors into one clear line
and exit code 2 instead of a long traceback.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict

import moelora
from moelora.training import outputs
from moelora.training.checkpoint import AtomicCheckpointIO
from moelora.training.module import check_same_adapter

log = logging.getLogger("moelora.train")

# The repo's conf/, next to the moelora package (editable install). An absolute path, because
# Hydra reads a relative config_path of an imported module as a Python package ("pkg://conf").
CONFIG_PATH = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(ValueError):
    """A bad value in the composed config, found before any training step."""


@contextlib.contextmanager
def config_errors(phase: str) -> Iterator[None]:
    """Turn the errors a wrong config value raises while ``phase`` is being built into ConfigError.

    Only the set-up phases are wrapped: an exception during training is a bug and keeps its
    traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, KeyError, FileNotFoundError, TypeError, InstantiationException) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise ConfigError(f"{phase}: {msg}") from err


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_adapter_config(cfg: DictConfig) -> moelora.config.AdapterConfig:
    """``cfg.adapter`` (a dict with ``method``) -> a validated moelora adapter config."""
    with config_errors("adapter config"):
        if cfg.get("adapter") is None:
            raise ValueError("no adapter selected: use adapter=lora|mixlora|lora_switch")
        return moelora.config_from_dict(_container(cfg.adapter))


def instantiate_group(node: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (name -> config)."""
    objs: list[Any] = []
    if not node:
        return objs
    for name, conf in node.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.debug("instantiating %s %s <%s>", kind, name, conf._target_)
            objs.append(hydra.utils.instantiate(conf))
    return objs


def model_name(cfg: DictConfig) -> str:
    """``model.name_or_path``, or the builder's name for in-process models (tiny_llama)."""
    return str(cfg.model.get("name_or_path") or cfg.model._target_.rsplit(".", 1)[-1])


def set_cpu_threads(setting: Any, model_params: int) -> None:
    """``cpu_threads``: an int, null (torch's default), or ``auto``: one thread for tiny models,
    whose per-op work is too small to split, so extra threads only add synchronisation (and on
    shared cores, spin-waiting: 10x slower steps were measured with 2 threads on 2 busy cores)."""
    if setting is None:
        return
    if setting == "auto":
        if model_params >= 20_000_000:
            return
        setting = 1
    if not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"cpu_threads must be a positive integer, 'auto' or null, got {setting!r}")
    torch.set_num_threads(setting)


def _rank() -> int:
    """Global rank before the trainer exists (DDP children get it from the launcher's env)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path``, or with ``resume`` the run's last.ckpt."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path {str(path)!r} does not exist")
        return str(path)
    resume = cfg.get("resume")
    if not resume:
        return None
    run_dir = Path(cfg.paths.output_dir) if resume is True else Path(str(resume))
    path = run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(
            f"resume={resume}: no checkpoint at {path}. Resume a run with `resume=<its run directory>`, "
            "or in place with `resume=true hydra.run.dir=<its run directory>`, or pass `ckpt_path=`."
        )
    return str(path)


@dataclass
class Run:
    """The typed objects one config builds (what ``train`` returns as ``objects``)."""

    cfg: DictConfig
    adapter_cfg: Any
    datamodule: Any
    model: Any
    module: Any
    trainer: pl.Trainer
    callbacks: list
    loggers: list
    ckpt_path: str | None
    params: dict


def build_run(cfg: DictConfig) -> Run:
    """Instantiate everything from ``cfg``. Every part a bad value can break is built here, before
    any training step, and the errors a bad value raises come out as ConfigError."""
    run_dir = Path(cfg.paths.output_dir)
    adapter_cfg = build_adapter_config(cfg)  # cheap checks first: no model is loaded for a typo
    with config_errors("data"):
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.prepare_examples()  # reads files / generates the suite: unknown task, missing file
    ckpt_path = resolve_ckpt_path(cfg)
    with config_errors("model"):
        log.info("loading base model %s", model_name(cfg))
        model, tokenizer = hydra.utils.instantiate(cfg.model)
    with config_errors("adapter"):
        model = moelora.inject_adapter(model, adapter_cfg)
    if ckpt_path:
        with config_errors("resume"):
            check_same_adapter(torch.load(ckpt_path, map_location="cpu", weights_only=True), model)
    params = moelora.trainable_parameters(model)
    set_cpu_threads(cfg.get("cpu_threads"), params["total"])
    log.info("adapter %s: %s trainable of %s parameters (%.2f%%)", adapter_cfg.method,
             f"{params['trainable']:,}", f"{params['total']:,}", params["percent"])
    with config_errors("data"):
        datamodule.set_tokenizer(tokenizer)
        datamodule.setup("fit")
    with config_errors("module"):
        max_new = cfg.module.get("max_new_tokens") or datamodule.max_target_tokens() + 1
        module = hydra.utils.instantiate(
            cfg.module, model=model, tokenizer=tokenizer, task_names=datamodule.task_names,
            score_fn=datamodule.score_fn, max_new_tokens=max_new,
        )
    if ckpt_path and _rank() == 0 and Path(ckpt_path).parent.parent.resolve() == run_dir.resolve():
        # resuming in place: CSVLogger deletes metrics.csv when it starts, so keep it aside first
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"]
        outputs.set_aside_metrics_for_resume(run_dir, int(step))
    callbacks = instantiate_group(cfg.get("callbacks"), "callback")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    with config_errors("trainer"):
        trainer: pl.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
        )
    for lg in trainer.loggers:  # not `loggers`: fast_dev_run swaps them for a dummy
        lg.log_hyperparams(_container(cfg))
    return Run(cfg, adapter_cfg, datamodule, model, module, trainer, callbacks, loggers, ckpt_path, params)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (and evaluate) the adapter the config describes; write the run directory.

    Returns ``(metrics, objects)``: final metrics as floats, and the objects that produced them
    (the fields of ``Run``, plus ``results`` on rank 0)."""
    start = time.time()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run = build_run(cfg)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
    elif run.ckpt_path:  # evaluate a checkpoint without training
        module.load_state_dict(torch.load(run.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    metrics = {k: outputs.to_float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", True):
        for k, v in (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0].items():
            metrics[k] = outputs.to_float(v)

    objects = dict(vars(run))
    if trainer.is_global_zero:
        results = write_run_outputs(cfg, run_dir, run.model, run.adapter_cfg, run.params, metrics, trainer, start)
        objects["results"] = results
        outputs.print_run_summary(run_dir, results)
    return metrics, objects


def write_run_outputs(cfg, run_dir, model, adapter_cfg, params, metrics, trainer, start) -> dict[str, Any]:
    """adapter/, results.json and curves.png of a finished run (rank 0 only)."""
    for lg in trainer.loggers:
        lg.save()  # flush metrics.csv before plotting it
    outputs.merge_resumed_metrics(run_dir)
    if cfg.get("save_adapter", True):
        moelora.save_adapter(model, run_dir / "adapter")
    results = {
        "status": "finished" if not trainer.interrupted else "interrupted",
        "run_dir": str(run_dir),
        "method": adapter_cfg.method,
        "adapter": adapter_cfg.to_dict(),
        "model": model_name(cfg),
        "seed": cfg.get("seed"),
        "global_step": trainer.global_step,
        "metrics": {k: v for k, v in sorted(metrics.items()) if v is not None},
        "trainable_params": params,
        "wall_time_s": round(time.time() - start, 2),
        "versions": outputs.library_versions(),
    }
    if HydraConfig.initialized():
        results["overrides"] = list(HydraConfig.get().overrides.task)
    outputs.write_json_atomic(run_dir / outputs.RESULTS_NAME, results)
    if cfg.get("plot", True):
        outputs.plot_curves(run_dir / outputs.METRICS_NAME, run_dir / "curves.png")
    return results


def compose_train_config(overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The config ``moelora-train <overrides>`` would run, for tests and notebooks.

    ``output_dir`` replaces Hydra's timestamped run directory (and holds the logs)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=True)
    out = str(Path(output_dir or Path.cwd() / "logs" / "composed").resolve())
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = out
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    with open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.paths.log_dir = str(Path(out).parent)
    return cfg


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """``moelora-train [key=value ...]``; with no arguments, the offline CPU quickstart."""
    try:
        metrics, _ = train(cfg)
    except ConfigError as err:
        if os.environ.get("MOELORA_DEBUG"):
            raise
        print(f"moelora-train: error: {err}  (set MOELORA_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    return metrics.get("test/acc")  # what a Hydra sweeper would optimise


class SweepSummaryCallback(HydraCallback):
    """At the end of ``moelora-train -m ...``: summary.csv and summary.md in the sweep folder."""

    def __init__(self) -> None:
        self.sweep_dirs: set[Path] = set()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:  # the job's output dir is <sweep dir>/<subdir>
            self.sweep_dirs.add(Path(config.hydra.runtime.output_dir).parent)
        except Exception:  # noqa: BLE001 - a summary must never fail a sweep
            pass

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for sweep_dir in sorted(self.sweep_dirs):
            written = outputs.summarize_sweep(sweep_dir)
            if written:
                print(f"Sweep summary: {written[1]} (and {written[0].name})")
                print(written[1].read_text())


if __name__ == "__main__":
    train_main()
