"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, total_steps: int, name: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """Factor applied to the base LR at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # never 0, so the first step already learns
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def warmup_lr_schedule(
    optimizer: Optimizer,
    total_steps: int,
    name: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """LambdaLR stepping once per optimizer step: warmup to the base LR, then decay to
    ``min_lr_ratio`` x base LR at ``total_steps`` (the module passes Lightning's
    ``estimated_stepping_batches``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; choose from {list(SCHEDULES)}")
    if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")
    return LambdaLR(
        optimizer, lambda step: lr_multiplier(step, int(total_steps), name, warmup_steps, min_lr_ratio)
    )
