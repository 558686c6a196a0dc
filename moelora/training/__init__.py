"""Training with PyTorch Lightning: the LightningModule, the DataModule, LR schedules, a
resumable sampler, atomic checkpoints and the files a run writes. No Hydra in here: the
``moelora-train`` entry point (moelora/cli.py) builds these objects from the config."""
from .checkpoint import AtomicCheckpointIO
from .datamodule import MoeLoraDataModule
from .module import MoeLoraModule
from .sampling import ResumableDataLoader, ResumableSampler
from .schedules import warmup_lr_schedule

__all__ = [
    "AtomicCheckpointIO", "MoeLoraDataModule", "MoeLoraModule", "ResumableDataLoader",
    "ResumableSampler", "train_concurrently", "warmup_lr_schedule",
]


def __getattr__(name: str):
    # train_concurrently reads composed moelora-train configs through moelora.cli, which imports
    # this package: imported on first use, so that there is no import cycle.
    if name == "train_concurrently":
        from .concurrent import train_concurrently

        return train_concurrently
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
