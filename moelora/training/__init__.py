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
    "ResumableSampler", "warmup_lr_schedule",
]
