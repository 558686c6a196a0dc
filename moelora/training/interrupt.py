"""Ctrl-C during ``trainer.fit``: stop at the next optimizer-step boundary with a checkpoint.

The first SIGINT only sets a flag; at the end of the current training batch the callback writes
``checkpoints/last.ckpt`` (the same hook and state as ModelCheckpoint's periodic save, so the
resume is exact) and asks the trainer to stop. A second Ctrl-C raises KeyboardInterrupt at once
(Lightning's own shutdown; the last periodic checkpoint stays the resume point). Only in a
single process on the main thread: with several ranks, each rank would stop at its own step.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where ``last.ckpt`` goes: the ModelCheckpoint's folder, else <default_root_dir>/checkpoints."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class GracefulInterrupt(pl.Callback):
    """The first Ctrl-C stops training after the current step and saves a resumable checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.checkpoint: Path | None = None  # written when the stop happened
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nmoelora-train: Ctrl-C: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested, self.checkpoint = False, None
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.requested or trainer.should_stop:
            return
        trainer.should_stop = True
        if not trainer.fast_dev_run:
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)  # optimizer and loop state too
            self.checkpoint = path

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
