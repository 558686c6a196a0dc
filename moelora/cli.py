"""Command-line entry point ``moelora-train``: the only code that sees Hydra's DictConfig.

``train(cfg)`` instantiates typed objects from the composed config, trains, evaluates and writes
the run directory; it returns ``(metrics, objects)`` so tests can call it after ``compose()``.
``hydra_train_main`` is the ``@hydra.main`` task; ``train_main`` (the console script) runs it and
turns every error a bad input causes (our config checks, Hydra's composition errors, an unusable
checkpoint, an unwritable log folder) into one line ``moelora-train: error: ...`` and exit code 2
instead of a long traceback. In a sweep a failed job is recorded and the others run; Ctrl-C
writes the run's outputs and a resume command (exit code 130).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import threading
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
from omegaconf.errors import OmegaConfBaseException

import moelora
from moelora.training import outputs
from moelora.training.checkpoint import AtomicCheckpointIO, CheckpointError, check_resumable, read_checkpoint
from moelora.training.interrupt import GracefulInterrupt, last_checkpoint_path
from moelora.training.module import attach_adapter, check_same_adapter
from moelora.training.throughput import TrainThroughput
from moelora.training.validate import ConfigValueError, check_config_values, check_target_keys

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
    except (ValueError, KeyError, FileNotFoundError, TypeError, InstantiationException, OmegaConfBaseException) as err:
        msg = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
        # one line: Hydra's InstantiationException spreads over several ("Error in call ...", the
        # cause, "full_key: ...")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith("full_key:")]
        raise ConfigError(f"{phase}: {' '.join(lines)}") from err


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


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the plain values (moelora/training/validate.py), before any work."""
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    missing = sorted(OmegaConf.missing_keys(task_cfg))
    if missing:
        raise ConfigError(f"{missing[0]} has no value (??? in its config): set it, e.g. {missing[0]}=<value>"
                          + (f" (also missing: {', '.join(missing[1:])})" if missing[1:] else ""))
    with config_errors("config"):
        plain = OmegaConf.to_container(task_cfg, resolve=True)
    try:
        check_config_values(plain)
        check_target_keys(plain)
    except ConfigValueError as err:
        raise ConfigError(str(err)) from None


def build_run(cfg: DictConfig) -> Run:
    """Instantiate everything from ``cfg``. Every part a bad value can break is built here, before
    any training step, and the errors a bad value raises come out as ConfigError."""
    run_dir = Path(cfg.paths.output_dir)
    check_values(cfg)
    adapter_cfg = build_adapter_config(cfg)  # cheap checks first: no model is loaded for a typo
    with config_errors("data"):
        datamodule = hydra.utils.instantiate(cfg.data)
        datamodule.prepare_examples()  # reads files / generates the suite: unknown task, missing file
    ckpt_path = resolve_ckpt_path(cfg)
    with config_errors("model"):
        log.info("loading base model %s", model_name(cfg))
        model, tokenizer = hydra.utils.instantiate(cfg.model)
    with config_errors("adapter"):
        model = attach_adapter(model, adapter_cfg, moelora.inject.DEFAULT_ADAPTER, cfg.get("seed"))
    if ckpt_path:
        # the whole checkpoint is read and checked now: a torn file or another base model's
        # checkpoint is one line here, not a traceback from inside trainer.fit
        try:
            ckpt = read_checkpoint(ckpt_path)
        except CheckpointError as err:
            raise ConfigError(f"resume: {err}") from None
        with config_errors(f"resume from {ckpt_path!r}"):
            check_same_adapter(ckpt, model)  # first: names the config keys that differ
        try:
            check_resumable(ckpt, ckpt_path, model, moelora.adapter_state_dict(model))
        except CheckpointError as err:
            raise ConfigError(f"resume: {err}") from None
        del ckpt
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
    callbacks.append(GracefulInterrupt())  # Ctrl-C: stop after the step, with a checkpoint
    callbacks.append(TrainThroughput())  # tokens/s and peak memory of the training steps, for results.json
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
    (the fields of ``Run``, plus ``results`` on rank 0). Ctrl-C during training ends the run early
    but still writes results.json (``"status": "interrupted"``), the adapter and a resume command
    (``objects["interrupted"]`` is then True)."""
    start = time.time()
    run_dir = Path(cfg.paths.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(unwritable_dir_message(err)) from None
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    run = build_run(cfg)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    stopper = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulInterrupt)), None)

    interrupted = False
    if cfg.get("train", True):
        previous_sigint = signal.getsignal(signal.SIGINT)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
        except SystemExit:
            # Lightning turns a KeyboardInterrupt into sys.exit(1) after its own shutdown
            if not trainer.interrupted:
                raise
            interrupted = True
        finally:
            # after an interrupt Lightning leaves Ctrl-C ignored, or (its signal connector's teardown)
            # set back to the stop-after-this-step handler: Ctrl-C must work as before the fit
            if threading.current_thread() is threading.main_thread() and previous_sigint is not None:
                signal.signal(signal.SIGINT, previous_sigint)
        interrupted = interrupted or bool(stopper and stopper.requested)
    elif run.ckpt_path:  # evaluate a checkpoint without training
        module.load_state_dict(torch.load(run.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    metrics = {k: outputs.to_float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test", True) and not interrupted:
        for k, v in (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0].items():
            metrics[k] = outputs.to_float(v)

    objects = dict(vars(run))
    objects["interrupted"] = interrupted
    if trainer.is_global_zero:
        resume = None
        if interrupted:
            last = last_checkpoint_path(trainer)
            resume = resume_command(cfg, last) if last.is_file() else None
        results = write_run_outputs(cfg, run_dir, run.model, run.adapter_cfg, run.params, metrics, trainer, start,
                                    interrupted=interrupted, resume=resume)
        objects["results"] = results
        outputs.print_run_summary(run_dir, results)
        if interrupted:
            print(f"Interrupted at step {trainer.global_step}: the adapter of this step is in {run_dir / 'adapter'}"
                  if cfg.get("save_adapter", True) else f"Interrupted at step {trainer.global_step}.")
            print(f"Resume with: {resume}" if resume else
                  "No checkpoint was written before the interrupt: nothing to resume from.")
    return metrics, objects


def resume_command(cfg: DictConfig, ckpt: Path) -> str:
    """The command line that continues this run from ``ckpt`` (the run's overrides + ckpt_path)."""
    overrides: list[str] = []
    if HydraConfig.initialized():
        with contextlib.suppress(Exception):
            overrides = [str(o) for o in HydraConfig.get().overrides.task]
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "resume")]
    return " ".join(["moelora-train", *map(shlex.quote, keep), shlex.quote(f"ckpt_path={ckpt.resolve()}")])


def unwritable_dir_message(err: OSError) -> str:
    """One line for a run/log/sweep directory that cannot be created or written."""
    where = err.filename or "the run directory"
    why = err.strerror or type(err).__name__
    return (f"cannot write the log directory {str(where)!r}: {why}. Move the logs with MOELORA_LOG_DIR=<writable dir> "
            "(or hydra.run.dir=<dir>, hydra.sweep.dir=<dir> for -m)")


def write_run_outputs(cfg, run_dir, model, adapter_cfg, params, metrics, trainer, start, *,
                      interrupted: bool | None = None, resume: str | None = None, loggers: list | None = None,
                      global_step: int | None = None, adapter_name: str | None = None,
                      meter: TrainThroughput | None = None) -> dict[str, Any]:
    """adapter/, results.json and curves.png of a finished or interrupted run (rank 0 only).

    ``loggers``, ``global_step`` and ``adapter_name`` default to the trainer's and the model's
    active adapter; concurrent training (``moelora.training.concurrent``) passes its own per job."""
    for lg in trainer.loggers if loggers is None else loggers:
        lg.save()  # flush metrics.csv before plotting it
    outputs.merge_resumed_metrics(run_dir)
    if cfg.get("save_adapter", True):
        moelora.save_adapter(model, run_dir / "adapter", adapter_name=adapter_name)
    if interrupted is None:
        interrupted = trainer.interrupted
    results = {
        "status": "interrupted" if interrupted else "finished",
        "run_dir": str(run_dir),
        "method": adapter_cfg.method,
        "adapter": adapter_cfg.to_dict(),
        "model": model_name(cfg),
        "seed": cfg.get("seed"),
        "global_step": trainer.global_step if global_step is None else global_step,
        "metrics": {k: v for k, v in sorted(metrics.items()) if v is not None},
        "trainable_params": params,
        "wall_time_s": round(time.time() - start, 2),
        "versions": outputs.library_versions(),
    }
    if meter is None:
        meter = next((cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, TrainThroughput)), None)
    if meter is not None and meter.summary() is not None:
        results["throughput"] = meter.summary()
    if resume:
        results["resume_command"] = resume
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


# Whether Hydra got as far as calling the task (an error before it is about the command line)
_TASK_STARTED = False
# The sweep folder of a sweep stopped by Ctrl-C (its summary is written for the jobs so far)
_INTERRUPTED_SWEEP: Path | None = None
# Jobs of this process's sweep that failed: (job dir, error line, was it a config error)
_SWEEP_FAILURES: list[tuple[str, str, bool]] = []
PREFIX = "moelora-train: error:"


def _in_multirun() -> bool:
    if not HydraConfig.initialized():
        return False
    from hydra.types import RunMode

    with contextlib.suppress(Exception):
        return HydraConfig.get().mode == RunMode.MULTIRUN
    return False


def _record_failed_job(cfg: DictConfig, message: str) -> None:
    """results.json of a job that stopped on an error, so that the sweep summary lists it."""
    with contextlib.suppress(Exception):
        run_dir = Path(cfg.paths.output_dir)
        adapter = cfg.get("adapter")
        results = {"status": "failed", "error": message, "run_dir": str(run_dir),
                   "method": adapter.get("method") if isinstance(adapter, DictConfig) else None,
                   "model": model_name(cfg), "seed": cfg.get("seed"), "versions": outputs.library_versions()}
        if HydraConfig.initialized():
            results["overrides"] = list(HydraConfig.get().overrides.task)
        outputs.write_json_atomic(run_dir / outputs.RESULTS_NAME, results)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def hydra_train_main(cfg: DictConfig) -> float | None:
    """The Hydra task: one run, or one job of a sweep. In a sweep, a job that fails is recorded
    (results.json with its error, listed by the summary) and the sweep goes on."""
    global _TASK_STARTED
    _TASK_STARTED = True
    try:
        metrics, objects = train(cfg)
    except ConfigError as err:
        if os.environ.get("MOELORA_DEBUG"):
            raise
        if not _in_multirun():  # (no results.json: a resume in place keeps the old run's)
            _exit_with(str(err))  # SystemExit passes Hydra by (it would log the failure once more)
        _record_failed_job(cfg, str(err))
        print(f"{PREFIX} job {cfg.paths.output_dir}: {err}", file=sys.stderr)
        _SWEEP_FAILURES.append((str(cfg.paths.output_dir), str(err), True))
        return None
    except Exception as err:
        if not _in_multirun():
            raise
        line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        log.exception("job %s failed", cfg.paths.output_dir)  # the traceback goes to the job's log
        _record_failed_job(cfg, line)
        _SWEEP_FAILURES.append((str(cfg.paths.output_dir), line, False))
        return None
    if objects.get("interrupted"):
        if _in_multirun():
            global _INTERRUPTED_SWEEP
            _INTERRUPTED_SWEEP = Path(cfg.paths.output_dir).parent
            raise KeyboardInterrupt  # Ctrl-C stops the whole sweep (this job's outputs are written)
        sys.exit(130)
    return metrics.get("test/acc")  # what a Hydra sweeper would optimise


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error (often several lines, with the config search path) as one line."""
    text = str(err).strip()
    if type(err).__name__ == "MissingConfigException" or "Available options" in text:
        lines = [ln.strip() for ln in text.split("Config search path")[0].splitlines() if ln.strip()]
        head = [ln for ln in lines if not ln.startswith("Available options")]
        options = lines[lines.index(next(ln for ln in lines if ln.startswith("Available options"))) + 1:] \
            if any(ln.startswith("Available options") for ln in lines) else []
        first = next((ln for ln in head if ln not in options), text)
        return first + (f" Available options: {', '.join(options)}" if options else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if getattr(err, "override", None):  # OverrideParseException: say which override
        lines.insert(0, f"cannot parse the override {err.override!r}:")
    return " ".join(ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "Set the environment"))) \
        or type(err).__name__


def train_main() -> None:
    """``moelora-train [key=value ...]``; with no arguments, the offline CPU quickstart.

    Every error a bad command line or config causes, Hydra's included (an unknown group option,
    a malformed override, a missing ``???`` value), a checkpoint that cannot be resumed and a log
    directory that cannot be written end in one line ``moelora-train: error: ...`` and exit code 2
    (MOELORA_DEBUG=1 shows the traceback). Ctrl-C exits with 130 after writing the run's outputs.
    A sweep runs every job; it exits 2 (or 1 for a crash) if any job failed."""
    from hydra.errors import HydraException

    debug = bool(os.environ.get("MOELORA_DEBUG"))
    _register_concurrent_launcher()
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exit(1)
    global _TASK_STARTED, _INTERRUPTED_SWEEP
    _SWEEP_FAILURES.clear()
    _TASK_STARTED, _INTERRUPTED_SWEEP = False, None
    try:
        hydra_train_main()  # returns None: the console script's sys.exit(train_main()) exits 0
    except ConfigError as err:
        if debug:
            raise
        _exit_with(str(err))
    except (HydraException, OmegaConfBaseException) as err:
        if debug:
            raise
        _exit_with(one_line(err))
    except OSError as err:
        if debug or _TASK_STARTED or err.errno not in _DIR_ERRNOS:
            raise  # (the task itself reports an unwritable run directory as a ConfigError)
        _exit_with(unwritable_dir_message(err))
    except KeyboardInterrupt:
        if debug:
            raise
        if _INTERRUPTED_SWEEP is not None:
            _print_sweep_summary(_INTERRUPTED_SWEEP)
        print("moelora-train: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, TypeError, KeyError) as err:
        if debug or _TASK_STARTED:
            raise  # an error of the run itself keeps its traceback
        _exit_with(f"the command line: {one_line(err)}")  # Hydra composing the config, e.g. adapter=null
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    if _SWEEP_FAILURES:
        n = len(_SWEEP_FAILURES)
        print(f"{PREFIX} {n} sweep job(s) failed: " + "; ".join(f"{Path(d).name}: {e}" for d, e, _ in _SWEEP_FAILURES),
              file=sys.stderr)
        sys.exit(2 if all(c for _, _, c in _SWEEP_FAILURES) else 1)


def _register_concurrent_launcher() -> None:
    """``hydra/launcher=concurrent`` (hydra_plugins/moelora_concurrent) also where Hydra's plugin
    scan cannot list it: setuptools' editable installs map the ``hydra_plugins`` namespace through
    an import hook that ``pkgutil`` (Hydra's scan) cannot list, though the module imports."""
    with contextlib.suppress(ImportError):
        from hydra.core.plugins import Plugins
        from hydra_plugins.moelora_concurrent.launcher import ConcurrentLauncher

        Plugins.instance().register(ConcurrentLauncher)


# OSErrors that mean "this directory cannot be created or written" (Hydra makes the run dir first)
_DIR_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENOSPC}


def _exit_with(message: str) -> None:
    print(f"{PREFIX} {message}  (set MOELORA_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


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
            _print_sweep_summary(sweep_dir)


def _print_sweep_summary(sweep_dir: Path) -> None:
    written = outputs.summarize_sweep(sweep_dir)
    if written:
        print(f"Sweep summary: {written[1]} (and {written[0].name})")
        print(written[1].read_text())


if __name__ == "__main__":
    # `python -m moelora.cli`: run the entry point of the imported module, not of this __main__ copy,
    # so that the sweep state the concurrent launcher records (moelora.cli._SWEEP_FAILURES) is the one read
    from moelora.cli import train_main as _train_main

    _train_main()
