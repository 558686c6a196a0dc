"""Training with PyTorch Lightning: the LightningModule, the DataModule, LR schedules, a
resumable sampler, atomic checkpoints and the files a run writes. No Hydra in here: the
``moelora-train`` entry point (moelora/cli.py) builds these objects from the config.

The names below are imported on first use (PEP 562), so that the Lightning-free parts
(``training.packing``, used by the GPU benchmark of concurrent training) import without
Lightning, and ``train_concurrently`` (which reads composed configs through moelora.cli, an
importer of this package) makes no import cycle."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AtomicCheckpointIO": "checkpoint", "MoeLoraDataModule": "datamodule", "MoeLoraModule": "module",
    "ResumableDataLoader": "sampling", "ResumableSampler": "sampling", "train_concurrently": "concurrent",
    "warmup_lr_schedule": "schedules",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
