"""The concurrent Hydra launcher (``moelora-train -m ... hydra/launcher=concurrent``).

Hydra's basic launcher runs the task function once per job; this one prepares every job as
Hydra's ``run_job`` would (its output directory, ``.hydra/config.yaml``, ``hydra.yaml``,
``overrides.yaml``, the job callbacks) and then trains all of them at once with
``moelora.training.train_concurrently``. A job that fails is listed by the sweep summary with its
error (and makes ``moelora-train`` exit non-zero), as in a sweep of the basic launcher."""

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("moelora.train.concurrent")


@dataclass
class ConcurrentLauncherConf:
    """``hydra.launcher.*`` options (``hydra/launcher=concurrent``)."""

    _target_: str = "hydra_plugins.moelora_concurrent.launcher.ConcurrentLauncher"
    max_concurrent_jobs: Optional[int] = None  # jobs trained at once (null = all); queued jobs take freed places
    tokens_per_step: Optional[int] = None  # padded tokens per forward (null = every running job every step)
    resume: bool = False  # continue every unfinished job of hydra.sweep.dir from its checkpoints/last.ckpt
    progress: bool = True  # a tqdm bar over all optimizer steps


ConfigStore.instance().store(group="hydra/launcher", name="concurrent", node=ConcurrentLauncherConf, provider="moelora")


class ConcurrentLauncher(Launcher):
    def __init__(self, max_concurrent_jobs: Optional[int] = None, tokens_per_step: Optional[int] = None,
                 resume: bool = False, progress: bool = True) -> None:
        self.options = dict(max_concurrent_jobs=max_concurrent_jobs, tokens_per_step=tokens_per_step,
                            resume=resume, progress=progress)
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from moelora import cli
        from moelora.training.concurrent import train_concurrently

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # one log for the process (the jobs share it), in the sweep folder
        handler = logging.FileHandler(sweep_dir / "concurrent.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(min(logging.getLogger().level or logging.INFO, logging.INFO))
        log.info("Launching %d jobs concurrently in one process (%s)", len(job_overrides),
                 ", ".join(f"{k}={v}" for k, v in self.options.items()))
        cfgs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            cfgs.append(self._prepare_job(idx, list(overrides)))
        for key, value in (cfgs[0].hydra.job.env_set or {}).items() if cfgs else ():
            os.environ[str(key)] = str(value)
        cli._TASK_STARTED = True  # errors from here on are the jobs', not the command line's
        try:
            results = train_concurrently(cfgs, **self.options)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        returns = []
        for cfg, res in zip(cfgs, results):
            HydraConfig.instance().set_config(cfg)
            ret = JobReturn()
            ret.cfg = _task_cfg(cfg)
            ret.hydra_cfg = copy.deepcopy(cfg)
            ret.overrides = OmegaConf.to_container(cfg.hydra.overrides.task)
            ret.working_dir = os.getcwd()
            ret.task_name = cfg.hydra.job.name
            # a failed job is COMPLETED with no value, as moelora-train's task returns for one: Hydra's
            # sweeper re-raises a FAILED job's error and would end the sweep before the summary
            ret.status = JobStatus.COMPLETED
            ret.return_value = (res.get("metrics") or {}).get("test/acc") if res.get("status") == "finished" else None
            if res.get("status") != "finished":
                err = str(res.get("error"))
                print(f"{cli.PREFIX} job {cfg.hydra.runtime.output_dir}: {err}", file=__import__("sys").stderr)
                cli._SWEEP_FAILURES.append((str(cfg.hydra.runtime.output_dir), err, bool(res.get("config_error"))))
            self.hydra_context.callbacks.on_job_end(config=cfg, job_return=ret)
            returns.append(ret)
        return returns

    def _prepare_job(self, idx: int, overrides: list[str]) -> DictConfig:
        """What Hydra's ``run_job`` does before calling the task: the job's config, output
        directory and ``.hydra`` files, and the job-start callbacks."""
        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)
        output_dir = os.path.join(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                                  str(OmegaConf.select(cfg, "hydra.sweep.subdir")))
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(cfg)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if cfg.hydra.output_subdir is not None:
            out = Path(cfg.hydra.runtime.output_dir) / str(cfg.hydra.output_subdir)
            _save_config(_task_cfg(cfg), "config.yaml", out)
            _save_config(copy.deepcopy(HydraConfig.instance().cfg), "hydra.yaml", out)
            _save_config(cfg.hydra.overrides.task, "overrides.yaml", out)
        self.hydra_context.callbacks.on_job_start(config=cfg, task_function=self.task_function)
        return cfg


def _task_cfg(cfg: DictConfig) -> DictConfig:
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


__all__: Sequence[Any] = ["ConcurrentLauncher", "ConcurrentLauncherConf"]
