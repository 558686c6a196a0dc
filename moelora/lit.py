"""The Lightning pieces of moelora (docs/design.md: ``moelora/lit.py``); they live in moelora/training/."""
from moelora.training import MoeLoraDataModule, MoeLoraModule, warmup_lr_schedule

__all__ = ["MoeLoraDataModule", "MoeLoraModule", "warmup_lr_schedule"]
