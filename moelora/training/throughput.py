"""Training throughput of a run, for results.json (and the leaderboard): tokens/s over the
training steps only (forward, backward, optimizer; validation and checkpointing excluded) and
the peak device memory of training. Concurrent training (``moelora.training.concurrent``) feeds
one per job through ``add``: a job's seconds are those of the shared steps it took part in, so
its tokens/s is its rate while sharing the base, and ``concurrent_jobs_mean`` says with how many
jobs; the peak memory is the process's (every job's)."""
from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch


class TrainThroughput(pl.Callback):
    """Counts the non-padding input tokens (attention mask) and the loss tokens (labels != -100)
    of every training batch and times each batch from its start to the end of its step (on CUDA
    after a synchronize, so the time is the GPU's, at the cost of one sync per step)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.label_tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self.job_steps = 0  # sum over batches of the jobs sharing the step (1 per batch when solo)
        self._t0: float | None = None
        self._cuda: torch.device | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            return
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        self.add(time.perf_counter() - self._t0, batch)
        self._t0 = None

    def start(self, device: torch.device, reset_peak: bool = True) -> None:
        """Measure on ``device`` (its peak memory from now, unless ``reset_peak`` is False: a job
        that joins a running concurrent group keeps the group's peak)."""
        self._cuda = device if device.type == "cuda" else None
        if self._cuda is not None and reset_peak:
            torch.cuda.reset_peak_memory_stats(self._cuda)

    def add(self, seconds: float, batch: Any, jobs: int = 1) -> None:
        """One training batch of ``seconds`` (its step included); ``jobs``: how many jobs shared
        that step (concurrent training: the seconds are the shared step's)."""
        self.seconds += seconds
        self.steps += 1
        self.job_steps += jobs
        if isinstance(batch, dict):
            mask, labels = batch.get("attention_mask"), batch.get("labels")
            if isinstance(mask, torch.Tensor):
                self.tokens += int(mask.sum())
            elif isinstance(batch.get("input_ids"), torch.Tensor):
                self.tokens += batch["input_ids"].numel()
            if isinstance(labels, torch.Tensor):
                self.label_tokens += int((labels != -100).sum())

    def summary(self) -> dict[str, Any] | None:
        """The results.json block, or None before any training batch."""
        if not self.steps or self.seconds <= 0:
            return None
        out = {"train_batches": self.steps, "train_seconds": round(self.seconds, 3), "train_tokens": self.tokens,
               "train_tokens_per_s": round(self.tokens / self.seconds, 1),
               "train_label_tokens_per_s": round(self.label_tokens / self.seconds, 1)}
        if self._cuda is not None:
            out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self._cuda) / 2**20, 1)
        if self.job_steps > self.steps:  # trained beside other jobs: its rate while sharing the steps
            out["concurrent_jobs_mean"] = round(self.job_steps / self.steps, 2)
        return out
