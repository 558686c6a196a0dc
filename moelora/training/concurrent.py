"""Train many adapters at once over one frozen base (mLoRA, arXiv 2312.02515; docs/design.md §1).

``train_concurrently(cfgs)`` takes composed ``moelora-train`` configs (one per job), builds ONE base
model per group of jobs that can share it (same model config, device, precision, CPU threads),
adds every job's adapter under its own name, and trains them in one loop. Each micro-step
concatenates the jobs' micro-batches (right-padded to a common length: padding is masked in
attention and labels), runs one forward/backward over the base with one adapter name per row,
and gives each job the loss of its own rows (CE normalised by its own label tokens, plus its own
router loss). Everything else is per job: optimizer, LR schedule, gradient clipping by its own
norm, accumulation, seed (initial weights and a dropout stream of its own:
``training.module.attach_adapter``), data order, validation, checkpoints and the run directory,
written by the same code as a solo run (``moelora.cli.write_run_outputs``).

Why a loop by hand and not Lightning: one ``pl.Trainer`` steps one set of optimizers in lockstep;
here every job steps when its own accumulation is complete and stops at its own ``max_steps``.
The loop reproduces what the solo Lightning run does per optimizer step (loss / accumulation,
``clip_grad_norm_``, optimizer step, scheduler step), so a job trained here equals the same job
trained by ``moelora-train`` (tested to 1e-4). The packed step itself (concatenation, per-job
losses) is ``moelora.training.packing``, which the GPU benchmark times. Evaluation reuses the job's
``MoeLoraModule`` through ``pl.Trainer.validate/test`` with the job's adapter active.

Not shared with a solo run: the checkpoint format (``checkpoints/last.ckpt`` holds the adapter,
optimizer, scheduler, data position and dropout stream of the job; ``resume=True`` continues every
unfinished job from it, but ``moelora-train ckpt_path=`` does not read it).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import moelora
from moelora import cli
from moelora.training import outputs
from moelora.layers.dispatch import compiled_expert_hidden, plain_mixture_backward
from moelora.training.checkpoint import BASE_KEY, AtomicCheckpointIO, CheckpointError, base_signature, read_checkpoint
from moelora.training.module import attach_adapter, router_log_dict
from moelora.training.packing import pack_micro_batches, per_job_losses
from moelora.training.throughput import TrainThroughput

log = logging.getLogger("moelora.train.concurrent")

CKPT_KEY = "moelora_concurrent"  # marks a concurrent job's checkpoint (and holds its loop state)
PAD_MULTIPLE = 64  # packed length of a step of several jobs: a multiple of this (see _micro_step)
PRECISIONS = {"32-true": None, "32": None, 32: None, "bf16-mixed": torch.bfloat16}


@dataclass
class Job:
    """One training job of a concurrent run: its config, its objects and where its loop stands."""

    index: int
    cfg: DictConfig  # resolved task config (no hydra node)
    hydra_cfg: DictConfig | None  # the full config with its hydra node (for HydraConfig), if any
    name: str
    run_dir: Path
    status: str = "queued"  # queued | running | finished | failed
    error: str | None = None
    results: dict | None = None
    start: float = 0.0
    # built by _start_job
    adapter_cfg: Any = None
    datamodule: Any = None
    module: Any = None
    eval_trainer: Any = None
    loggers: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    trainable: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    loader: Any = None
    iterator: Any = None
    pending: Any = None  # the next micro-batch, drawn but not yet trained on
    # loop state
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done
    epoch: int = 0
    accum: int = 1
    max_steps: int = 0
    clip: float | None = None
    val_every: int | None = None  # in micro-batches, as Lightning's val_check_interval
    log_every: int = 50
    ckpt_every: int | None = None
    stats_every: int = 0
    losses: list = field(default_factory=list)  # (loss, aux) of the micro-batches of this step
    metrics: dict = field(default_factory=dict)
    meter: Any = None  # TrainThroughput fed by the loop: results.json's "throughput"

    def hydra_context(self) -> None:
        """Make this job's config the current HydraConfig (overrides in results.json, ${hydra:...})."""
        if self.hydra_cfg is not None:
            HydraConfig.instance().set_config(self.hydra_cfg)


def group_key(cfg: DictConfig) -> str:
    """What jobs must agree on to share one base model in one process."""
    t = cfg.trainer
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "accelerator": t.get("accelerator"), "devices": t.get("devices"), "precision": str(t.get("precision")),
        "cpu_threads": cfg.get("cpu_threads"),
    }
    return json.dumps(key, sort_keys=True, default=str)


def _task_config(cfg: DictConfig) -> tuple[DictConfig, DictConfig | None]:
    """(the resolved task config without ``hydra``, the full config if it has a hydra node).
    Resolved once, while this job's HydraConfig is current: ``${hydra:runtime.output_dir}`` and
    ``${now:...}`` must mean this job, not whichever job was set last in this process."""
    full = cfg if "hydra" in cfg else None
    if full is not None:
        HydraConfig.instance().set_config(full)
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.create(OmegaConf.to_container(task, resolve=True)), full


def train_concurrently(
    cfgs: Sequence[DictConfig],
    *,
    max_concurrent_jobs: int | None = None,
    tokens_per_step: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train the jobs ``cfgs`` (composed ``moelora-train`` configs, e.g. from
    ``moelora.cli.compose_train_config``) at once over one base model per group.

    Args:
        max_concurrent_jobs: jobs trained at the same time per group (None = all); a queued job
            takes the place of one that finished or failed.
        tokens_per_step: a budget of padded tokens per forward (None = every running job every
            step); jobs that do not fit wait for the next step, round robin. A job alone over the
            budget still runs.
        resume: continue every unfinished job from its ``checkpoints/last.ckpt``; jobs whose
            results.json says finished are not run again.
        progress: a tqdm bar over all optimizer steps.

    Returns every job's results (its results.json content, ``status`` finished or failed with
    ``error``), in the order of ``cfgs``. A job that fails (bad config or data file, a non-finite
    loss, an error in its evaluation) is stopped and recorded; the others go on."""
    if max_concurrent_jobs is not None and max_concurrent_jobs < 1:
        raise ValueError(f"max_concurrent_jobs must be >= 1 or None, got {max_concurrent_jobs}")
    if tokens_per_step is not None and tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1 or None, got {tokens_per_step}")
    jobs: list[Job] = []
    for i, cfg in enumerate(cfgs):
        task, full = _task_config(cfg)
        jobs.append(Job(i, task, full, f"job{i}", Path(task.paths.output_dir)))
    groups: OrderedDict[str, list[Job]] = OrderedDict()
    for job in jobs:
        try:
            groups.setdefault(group_key(job.cfg), []).append(job)
        except Exception as err:  # noqa: BLE001 - an unresolvable model config fails that job only
            _fail(job, f"config: {err}", config_error=True)
    if len(groups) > 1:
        log.info("%d jobs need %d different base models / devices / precisions: running them group by group "
                 "(one base per group)", len(jobs), len(groups))
        for g, members in enumerate(groups.values()):
            log.info("group %d: jobs %s (%s)", g, [j.index for j in members], cli.model_name(members[0].cfg))
    for members in groups.values():
        _run_group(members, max_concurrent_jobs, tokens_per_step, resume, progress)
    return [j.results or {"status": j.status, "error": j.error} for j in jobs]


# ---- one group: one base model ---------------------------------------------------------------
def _device(cfg: DictConfig) -> torch.device:
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _run_group(jobs: list[Job], max_jobs: int | None, token_budget: int | None, resume: bool, progress: bool) -> None:
    todo = []
    for job in jobs:
        if job.status == "failed":
            continue
        done = job.run_dir / outputs.RESULTS_NAME
        if resume and done.is_file() and json.loads(done.read_text()).get("status") == "finished":
            job.status, job.results = "finished", json.loads(done.read_text())
            log.info("job %s already finished: not run again", job.run_dir)
            continue
        todo.append(job)
    if not todo:
        return
    first = todo[0]
    first.hydra_context()
    precision = first.cfg.trainer.get("precision", "32-true")
    if precision not in PRECISIONS:
        for job in todo:
            _fail(job, f"trainer.precision={precision!r} is not supported by concurrent training; "
                       f"use one of {sorted(map(str, PRECISIONS))}", config_error=True)
        return
    try:
        with cli.config_errors("model"):
            log.info("loading base model %s (shared by %d jobs)", cli.model_name(first.cfg), len(todo))
            model, tokenizer = hydra.utils.instantiate(first.cfg.model)
        model.to(_device(first.cfg))
    except Exception as err:  # noqa: BLE001 - the group's jobs fail, the other groups go on
        for job in todo:
            _fail(job, str(err), config_error=isinstance(err, cli.ConfigError))
        return
    cli.set_cpu_threads(first.cfg.get("cpu_threads"), sum(p.numel() for p in model.parameters()))
    _GroupLoop(model, tokenizer, todo, max_jobs, token_budget, resume, PRECISIONS[precision], progress).run()
    del model  # the next group's base takes its place
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _GroupLoop:
    """The step loop over the running jobs of one group (see the module docstring)."""

    def __init__(self, model, tokenizer, jobs, max_jobs, token_budget, resume, autocast_dtype, progress) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.queue = list(jobs)
        self.running: list[Job] = []
        self.max_jobs = max_jobs or len(jobs)
        self.token_budget = token_budget
        self.resume = resume
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.turn = 0  # round robin start under a token budget
        from tqdm.auto import tqdm

        total = sum(int(j.cfg.trainer.get("max_steps", 0) or 0) for j in jobs)
        self.bar = tqdm(total=total, desc=f"{len(jobs)} jobs", unit="step", disable=not progress, dynamic_ncols=True)

    def run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            while self.queue or self.running:
                while self.queue and len(self.running) < self.max_jobs:
                    job = self.queue.pop(0)
                    try:
                        self._start(job)
                    except Exception as err:  # noqa: BLE001
                        _fail(job, _one_line(err), self.model, config_error=isinstance(err, cli.ConfigError))
                        continue
                    self.bar.update(job.step)  # steps done before a resume
                    if job.step >= job.max_steps:
                        self._finish(job)  # resumed after its last step
                    else:
                        self.running.append(job)
                    self.bar.set_postfix(running=len(self.running), queued=len(self.queue), refresh=False)
                if not self.running:
                    continue
                self._micro_step()
        finally:
            self.bar.close()

    # ---- a job's life --------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        job.start = time.time()
        job.hydra_context()
        cfg = job.cfg
        try:
            job.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise cli.ConfigError(cli.unwritable_dir_message(err)) from None
        _save_task_config(job)
        cli.check_values(cfg)
        if cfg.get("ckpt_path") or cfg.get("resume"):
            raise cli.ConfigError("ckpt_path/resume are not read by concurrent training: resume a concurrent sweep "
                                  "with hydra.launcher.resume=true (train_concurrently(..., resume=True))")
        if not cfg.get("train", True):
            raise cli.ConfigError("train=false: concurrent training trains; evaluate an adapter with moelora-train "
                                  "train=false ckpt_path=<checkpoint> (or moelora-eval)")
        t = cfg.trainer
        if t.get("fast_dev_run"):
            raise cli.ConfigError("trainer.fast_dev_run is not supported by concurrent training: set trainer.max_steps")
        job.max_steps = int(t.get("max_steps") or -1)
        if job.max_steps <= 0:
            raise cli.ConfigError(f"concurrent training counts optimizer steps: set trainer.max_steps > 0 "
                                  f"(got {t.get('max_steps')})")
        job.accum = int(t.get("accumulate_grad_batches") or 1)
        job.clip = t.get("gradient_clip_val")
        vci = t.get("val_check_interval")
        job.val_every = int(vci) if isinstance(vci, int) and vci > 0 else None
        job.log_every = int(t.get("log_every_n_steps") or 50)
        ckpt = (cfg.get("callbacks") or {}).get("model_checkpoint")
        job.ckpt_every = int(ckpt.every_n_train_steps) if ckpt and ckpt.get("every_n_train_steps") else None
        job.stats_every = int(cfg.module.get("router_stats_every_n_steps") or 0)
        job.adapter_cfg = cli.build_adapter_config(cfg)
        if job.adapter_cfg.method not in ("lora", "mixlora") or getattr(job.adapter_cfg, "jitter_noise", 0.0) > 0:
            # only LoRA and MixLoRA layers draw dropout from the job's own stream; router jitter and
            # the other methods' dropout use torch's global RNG, which every job of the group shares
            log.warning("job %s (%s%s) draws random numbers from torch's global RNG: it trains, but its "
                        "numbers depend on the other jobs beside it", job.run_dir, job.adapter_cfg.method,
                        ", jitter_noise > 0" if getattr(job.adapter_cfg, "jitter_noise", 0.0) > 0 else "")
        with cli.config_errors("data"):
            job.datamodule = hydra.utils.instantiate(cfg.data)
            job.datamodule.prepare_examples()
        ckpt_path = job.run_dir / "checkpoints" / "last.ckpt"
        resume_from = ckpt_path if self.resume and ckpt_path.is_file() else None
        with cli.config_errors("adapter"):
            attach_adapter(self.model, job.adapter_cfg, job.name, cfg.get("seed"))
        job.status = "running"
        job.meter = TrainThroughput()
        job.meter.start(self.device, reset_peak=False)  # the group's peak: reset once, in run()
        job.params = _adapter_param_counts(self.model, job.name)
        job.trainable = [p for p in moelora.adapter_parameters(self.model, job.name).values() if p.requires_grad]
        with cli.config_errors("data"):
            job.datamodule.set_tokenizer(self.tokenizer)
            job.datamodule.setup("fit")
        with cli.config_errors("module"):
            dm = job.datamodule
            max_new = cfg.module.get("max_new_tokens") or dm.max_target_tokens() + 1
            job.module = hydra.utils.instantiate(cfg.module, model=self.model, tokenizer=self.tokenizer,
                                                 task_names=dm.task_names, score_fn=dm.score_fn, max_new_tokens=max_new)
        job.optimizer = job.module.optimizer_factory(params=job.trainable)
        if job.module.scheduler_factory is not None:
            job.scheduler = job.module.scheduler_factory(optimizer=job.optimizer, total_steps=job.max_steps)
        job.loader = job.datamodule.train_dataloader()
        if resume_from is not None:
            self._load_checkpoint(job, resume_from)
            outputs.set_aside_metrics_for_resume(job.run_dir, job.step)
        job.loggers = cli.instantiate_group(cfg.get("logger"), "logger")
        for lg in job.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        with cli.config_errors("trainer"), _quiet_lightning():
            # evaluation only: the job's validate/test run through Lightning with the job's module
            job.eval_trainer = hydra.utils.instantiate(
                cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
        log.info("job %s started as adapter %r (%s, %s trainable)%s", job.run_dir, job.name, job.adapter_cfg.method,
                 f"{job.params['trainable']:,}", f", resumed at step {job.step}" if resume_from else "")

    def _finish(self, job: Job) -> None:
        """Test, write the run directory, free the job's place (and its adapter)."""
        if job in self.running:
            self.running.remove(job)
        try:
            job.hydra_context()
            self._save_checkpoint(job)
            if job.cfg.get("test", True):
                job.metrics.update(self._evaluate(job, "test"))
            trainer = job.eval_trainer
            job.results = cli.write_run_outputs(
                job.cfg, job.run_dir, self.model, job.adapter_cfg, job.params, job.metrics, trainer, job.start,
                interrupted=False, loggers=job.loggers, global_step=job.step, adapter_name=job.name,
                meter=job.meter)
            job.status = "finished"
            log.info("job %s finished at step %d", job.run_dir, job.step)
        except Exception as err:  # noqa: BLE001
            _fail(job, _one_line(err), None)
        _drop_adapter(self.model, job.name)

    def _stop_failed(self, job: Job, message: str) -> None:
        self.running.remove(job)
        for lg in job.loggers:
            lg.save()
        _fail(job, message, self.model)

    # ---- the step ---------------------------------------------------------------------------
    def _next_batch(self, job: Job) -> dict:
        if job.pending is None:
            while True:
                if job.iterator is None:
                    job.loader.sampler.set_epoch(job.epoch)
                    job.iterator = iter(job.loader)
                try:
                    job.pending = next(job.iterator)
                    break
                except StopIteration:
                    job.epoch += 1
                    job.iterator = None
        return job.pending

    def _choose(self) -> list[Job]:
        """The running jobs of this forward: all of them, or under a token budget as many as fit
        (padded tokens), round robin so that every job gets its turn."""
        if self.token_budget is None:
            return list(self.running)
        n = len(self.running)
        order = [self.running[(self.turn + i) % n] for i in range(n)]
        chosen, rows, length = [], 0, 0
        for job in order:
            ids = self._next_batch(job)["input_ids"]
            new_rows, new_len = rows + ids.shape[0], max(length, ids.shape[1])
            if chosen and new_rows * new_len > self.token_budget:
                continue
            chosen.append(job)
            rows, length = new_rows, new_len
        self.turn = (self.turn + len(chosen)) % n
        return chosen

    def _micro_step(self) -> None:
        jobs = chosen = self._choose()
        batches = {j.name: self._next_batch(j) for j in jobs}
        t0 = time.perf_counter()  # as a solo run's meter: the step, not the data loading
        streams = {j.name: _dropout_state(self.model, j.name) for j in jobs}
        while jobs:
            # Several jobs: the packed length rounded up to a multiple of PAD_MULTIPLE, so that shapes
            # repeat (GPU: no new Triton specialisations, cuBLAS heuristics or allocator blocks per
            # length; each job's numbers are unchanged: padding is masked, dropout drawn in its own
            # length). One job: its exact solo forward (its dropout masks have the batch's shape).
            packed = pack_micro_batches([batches[j.name] for j in jobs], [j.name for j in jobs],
                                        jobs[0].datamodule._pad_id(), self.device,
                                        pad_to_multiple_of=PAD_MULTIPLE if len(jobs) > 1 else None)
            self.model.train()
            # the compiled expert hidden when every job of the step asks for it (a switch of the forward)
            # and the stored (not recomputed) mixture only when every job turns the recompute off
            # (the memory-safe form wins a mixed step)
            compiled = all(j.module.compiled_expert_hidden for j in jobs)
            plain = not any(j.module.mixture_recompute for j in jobs)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None), \
                    compiled_expert_hidden(compiled), plain_mixture_backward(plain):
                out = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                 adapter_names=packed.adapter_names)
            aux_losses = getattr(out, "aux_losses", None) or {}
            losses = []
            for job, ce in zip(jobs, per_job_losses(out.logits, packed)):
                aux = aux_losses.get(job.name)
                losses.append((ce if aux is None else ce + aux.to(ce.dtype), aux))
            # every job's loss (and aux) to the host in ONE copy: a float()/isfinite test per job is
            # a wait for the GPU queue each, 2N per step
            values = torch.stack([v.detach().float() for loss, aux in losses
                                  for v in ((loss,) if aux is None else (loss, aux))]).tolist()
            at, host = 0, []
            for _, aux in losses:
                host.append((values[at], None if aux is None else values[at + 1]))
                at += 1 if aux is None else 2
            bad = [(j, h[0]) for j, h in zip(jobs, host) if not math.isfinite(h[0])]
            if not bad:
                break
            # A job whose loss is not finite leaves, and the step runs again without it: its rows
            # must not be in the graph the others backpropagate through (non-finite activations
            # times the zero weights of a mixed batch's gathered math would reach their gradients).
            # The others' dropout streams are rewound, so they draw what they drew alone.
            del out, losses
            for job, value in bad:
                self._stop_failed(job, f"train/loss is {value} at step {job.step} (micro-batch {job.micro}): "
                                       "the job was stopped; lower module.optimizer.lr or check its data")
            jobs = [j for j in jobs if j.status == "running"]
            for job in jobs:
                _set_dropout_state(self.model, job.name, streams[job.name])
        for job in chosen:
            job.pending = None
        if not jobs:
            return
        total = None
        for job, (loss, aux), h in zip(jobs, losses, host):
            job.losses.append(h)
            part = loss / job.accum  # as Lightning: the accumulated gradient is the mean of the micro-batches'
            total = part if total is None else total + part
        total.backward()
        # the gradient norms (and clipping) of every job that steps now, then ONE host copy of them
        # for the finiteness checks: a check per job is a wait for the GPU queue each
        stepping = [job for job in jobs if (job.micro + 1) % job.accum == 0]
        norms = dict(zip((j.name for j in stepping), self._clip(stepping)))
        for job in jobs:
            first_of_step = job.micro % job.accum == 0
            job.micro += 1
            if first_of_step and job.stats_every and job.step % job.stats_every == 0:
                logs = router_log_dict(self.model, job.name)  # this forward's routing of the job's rows
                if logs:
                    job.metrics.update(logs)
                    self._log(job, logs)
            if job.micro % job.accum == 0:
                self._optimizer_step(job, norms[job.name])
        # the shared step's time (the validation and tests below are not in it), to every
        # job in it with its own tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        for job in jobs:
            job.meter.add(seconds, batches[job.name], jobs=len(jobs))
        for job in jobs:
            if job.val_every and job.micro % job.val_every == 0 and job.status == "running":
                self._validate(job)
            if job.step >= job.max_steps and job.status == "running":
                self._finish(job)

    @staticmethod
    def _clip(jobs: list[Job]) -> list[float]:
        """Each job's own gradient norm, its gradients clipped by it (Lightning's gradient_clip_val;
        inf = measure only, the gradients are multiplied by exactly 1.0), as host floats."""
        norms = [torch.nn.utils.clip_grad_norm_(j.trainable, float(j.clip) if j.clip else float("inf"))
                 for j in jobs]
        return torch.stack([n.float() for n in norms]).tolist() if norms else []

    def _optimizer_step(self, job: Job, norm: float) -> None:
        lr = job.optimizer.param_groups[0]["lr"]
        if not math.isfinite(norm):
            self._stop_failed(job, f"the gradient norm is {norm} at step {job.step}: the job was stopped; "
                                   "lower module.optimizer.lr or check its data")
            return
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        if job.scheduler is not None:
            job.scheduler.step()
        job.step += 1
        self.bar.update(1)
        losses, job.losses = job.losses, []
        loss = sum(v for v, _ in losses) / len(losses)
        row = {"train/loss": loss, "train/lr": lr, "epoch": job.epoch}
        auxes = [a for _, a in losses if a is not None]
        if auxes:
            aux = sum(auxes) / len(auxes)
            row.update({"train/aux_loss": aux, "train/ce_loss": loss - aux})
        job.metrics.update(row)
        if job.step % job.log_every == 0:
            self._log(job, row)
        if job.ckpt_every and job.step % job.ckpt_every == 0:
            self._save_checkpoint(job)

    def _log(self, job: Job, row: dict) -> None:
        for lg in job.loggers:
            lg.log_metrics(row, step=job.step)

    # ---- evaluation through the job's LightningModule --------------------------------------
    def _evaluate(self, job: Job, stage: str) -> dict[str, float]:
        run = job.eval_trainer.validate if stage == "val" else job.eval_trainer.test
        try:
            with moelora.use_adapter(self.model, job.name):
                results = run(job.module, datamodule=job.datamodule, verbose=False)
        finally:
            # Lightning's strategy teardown moves the module to the CPU after validate/test (GPU
            # trainers): the shared base of every other job with it. H200: the next job's first
            # forward failed with "index is on cuda:0, ... other tensors on cpu".
            if next(self.model.parameters()).device != self.device:
                self.model.to(self.device)
            self.model.train()
        metrics: dict[str, float] = {}
        for part in results or []:
            metrics.update({k: outputs.to_float(v) for k, v in part.items()})
        return metrics

    def _validate(self, job: Job) -> None:
        try:
            metrics = self._evaluate(job, "val")
        except Exception as err:  # noqa: BLE001
            self._stop_failed(job, f"validation: {_one_line(err)}")
            return
        job.metrics.update(metrics)
        self._log(job, {**metrics, "epoch": job.epoch})

    # ---- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self, job: Job) -> None:
        ckpt = {
            "state_dict": {f"model.{k}": v for k, v in moelora.adapter_state_dict(self.model, job.name).items()},
            "optimizer_states": [job.optimizer.state_dict()],
            "lr_schedulers": [job.scheduler.state_dict()] if job.scheduler is not None else [],
            "global_step": job.step,
            CKPT_KEY: {"micro": job.micro, "epoch": job.epoch, "loader": job.loader.state_dict(),
                       "metrics": {k: v for k, v in job.metrics.items() if v is not None}},
            "moelora_rng": {"dropout": _dropout_state(self.model, job.name)},
            "moelora_adapter_config": job.adapter_cfg.to_dict(),
            BASE_KEY: base_signature(self.model),
        }
        AtomicCheckpointIO().save_checkpoint(ckpt, job.run_dir / "checkpoints" / "last.ckpt")

    def _load_checkpoint(self, job: Job, path: Path) -> None:
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            raise cli.ConfigError(f"resume: {err}") from None
        if CKPT_KEY not in ckpt:
            raise cli.ConfigError(f"resume: {path} is not a checkpoint of concurrent training (no {CKPT_KEY!r}); "
                                  "resume it with moelora-train ckpt_path=<it>")
        if ckpt.get("moelora_adapter_config") != job.adapter_cfg.to_dict():
            raise cli.ConfigError(f"resume: {path} was trained with another adapter config than job {job.run_dir}'s")
        if ckpt.get(BASE_KEY) != base_signature(self.model):
            raise cli.ConfigError(f"resume: {path} was trained on another base model ({ckpt.get(BASE_KEY)})")
        moelora.load_adapter_state_dict(self.model, {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()},
                                        adapter_name=job.name)
        job.optimizer.load_state_dict(ckpt["optimizer_states"][0])
        if job.scheduler is not None and ckpt["lr_schedulers"]:
            job.scheduler.load_state_dict(ckpt["lr_schedulers"][0])
        loop = ckpt[CKPT_KEY]
        job.step, job.micro, job.epoch = int(ckpt["global_step"]), int(loop["micro"]), int(loop["epoch"])
        job.loader.load_state_dict(loop["loader"])
        job.metrics.update(loop.get("metrics", {}))
        gen = moelora.adapter_state(self.model).adapters[job.name].dropout_generator
        saved = ckpt["moelora_rng"].get("dropout")
        if gen is not None and saved is not None:
            gen.set_state(saved)


# ---- helpers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's start-up notices (GPU available, tips) once per job would bury the log."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dropout_state(model, name: str) -> torch.Tensor | None:
    gen = moelora.adapter_state(model).adapters[name].dropout_generator
    return None if gen is None else gen.get_state()


def _set_dropout_state(model, name: str, saved: torch.Tensor | None) -> None:
    gen = moelora.adapter_state(model).adapters[name].dropout_generator
    if gen is not None and saved is not None:
        gen.set_state(saved)


def _adapter_param_counts(model, name: str) -> dict[str, Any]:
    """trainable_parameters() of one adapter of a model holding several: its parameters over the
    base's (what the same job reports when it trains alone)."""
    trainable = sum(p.numel() for p in moelora.adapter_parameters(model, name).values())
    base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    total = base + trainable
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total}


def _drop_adapter(model, name: str) -> None:
    state = moelora.adapter_state(model)
    if state is not None and name in state.adapters:
        if len(state.adapters) == 1:
            moelora.remove_adapter(model)  # the base as it was loaded, for the next job
        else:
            moelora.delete_adapter(model, name)


def _fail(job: Job, message: str, model=None, config_error: bool = False) -> None:
    """Stop ``job``: its results.json says failed with ``message``; its adapter leaves the model.
    (``config_error`` in the returned results only: a bad input rather than a crash, exit code 2.)"""
    job.status, job.error = "failed", message
    log.error("job %s failed: %s", job.run_dir, message)
    job.hydra_context()
    cli._record_failed_job(job.cfg, message)
    path = job.run_dir / outputs.RESULTS_NAME
    job.results = json.loads(path.read_text()) if path.is_file() else {"status": "failed", "error": message}
    job.results["config_error"] = config_error
    if model is not None:
        _drop_adapter(model, job.name)


def _one_line(err: BaseException) -> str:
    if isinstance(err, cli.ConfigError):
        return str(err)
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _save_task_config(job: Job) -> None:
    """``.hydra/config.yaml`` as a solo run has it (the Python form has no Hydra job to write it)."""
    path = job.run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = job.hydra_cfg if job.hydra_cfg is not None else job.cfg
        OmegaConf.save(OmegaConf.masked_copy(src, [k for k in src if k != "hydra"]), path)
