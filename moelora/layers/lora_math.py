"""LoRA math shared by every method: initialisation, adapter and compute dtypes, input dropout
(one home for each)."""
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


def adapter_dropout_unscaled(dropout: nn.Module, x: torch.Tensor, state, name: str | None) -> tuple[torch.Tensor, float]:
    """``adapter_dropout`` with the 1/(1-p) rescale left to the caller: (x * keep, 1/(1-p)) for
    the same keep mask drawn from the adapter's own stream (exactly x or 0: one multiply, one
    backward node, instead of two of each), which a LoRA folds into its scaling; (x, 1.0) outside
    training, and (dropout(x), 1.0) where it has no own stream (nn.Dropout rescales itself)."""
    p = getattr(dropout, "p", 0.0)
    if not dropout.training or p == 0.0:
        return x, 1.0
    if state is None or name is None:
        return dropout(x), 1.0
    keep = state.dropout_keep(name, tuple(x.shape), torch.bool, x.device, p)
    if keep is None:
        return dropout(x), 1.0
    return x * keep, 1.0 / (1.0 - p)


def compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a LoRA matmul with weights of ``weight_dtype`` computes in on ``device_type``:
    autocast's where it is on and the weights are wider floats (it casts a matmul's operands so),
    else the weights' dtype."""
    if torch.is_autocast_enabled(device_type) and weight_dtype in (torch.float32, torch.float64):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


def lora_input(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """``x`` ready for a matmul with LoRA weights of ``weight_dtype``: cast to them, unless autocast
    would cast it straight back (bf16-mixed: bf16 activations, fp32 master weights). The bf16 ->
    fp32 -> bf16 round trip is exact, so skipping it changes no number; it was two elementwise
    kernels over the (tokens, in) input per linear forward and two more in backward."""
    if x.dtype == compute_dtype(x.device.type, weight_dtype):
        return x
    return x.to(weight_dtype)
