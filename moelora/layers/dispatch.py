"""When the layers take the one-launch decode kernels instead of their torch paths.

One rule for MixLoRA, LoRA-Switch and plain LoRA: inference (no grad, eval mode) with few
tokens, on tensors the kernel backend runs Triton for (``moelora.switches.triton_kernels_for``:
CUDA by default; CPU under the interpreter when asked). Under ``torch.compile`` the kernels
enter the graph as custom ops (``moelora_kernels.ops``), so the same rule holds in eager and
compiled decoding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..switches import triton_kernels_for

DECODE_MAX_TOKENS = 64  # at or below (decode, small prefill), inference uses the decode kernels


def decode_kernels_apply(x: torch.Tensor, module: nn.Module) -> bool:
    """x: the (tokens, features) input of the layer."""
    return (not torch.is_grad_enabled() and not module.training and x.shape[0] <= DECODE_MAX_TOKENS
            and triton_kernels_for(x))


def gathered_kernel_applies(x: torch.Tensor) -> bool:
    """The gathered shrink/expand Triton kernel (training and prefill too), vs its torch reference;
    under torch.compile the reference is traced and fused by Inductor instead."""
    return triton_kernels_for(x) and not torch.compiler.is_compiling()
