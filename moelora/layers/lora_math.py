"""LoRA math shared by every method: initialisation and adapter dtype (one home for both)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def resolve_dtype(adapter_dtype: str, base_weight: torch.Tensor) -> torch.dtype:
    if adapter_dtype == "auto":
        return base_weight.dtype
    return getattr(torch, adapter_dtype)


def init_lora_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str, r: int) -> None:
    """A: kaiming-uniform(a=sqrt(5)) (as nn.Linear) or N(0, 1/r); B: zeros, so the adapter
    starts as the identity map of the base model. Works on stacked [E, r, in] tensors too."""
    with torch.no_grad():
        for a in lora_A.view(-1, lora_A.shape[-2], lora_A.shape[-1]):
            if init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:
                nn.init.normal_(a, std=1.0 / r)
        lora_B.zero_()


def adapter_dropout(dropout: nn.Module, x: torch.Tensor, state, name: str | None) -> torch.Tensor:
    """``x`` through an adapter's LoRA dropout in training: drawn from the adapter's own stream
    (``state.dropout``, when the adapter ``name`` of the model state ``state`` has one) so that it
    does not depend on other adapters in the batch; else the ``nn.Dropout`` module itself."""
    p = getattr(dropout, "p", 0.0)
    if not dropout.training or p == 0.0:
        return x
    if state is None or name is None:
        return dropout(x)
    return state.dropout(name, x, p)
