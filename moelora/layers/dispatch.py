"""When the layers take the one-launch decode kernels instead of their torch paths.

One rule for MixLoRA, LoRA-Switch and plain LoRA: inference (no grad, eval mode) on CUDA with
few tokens. Under ``torch.compile`` the kernels enter the graph as custom ops
(``moelora_kernels.ops``), so the same rule holds in eager and compiled decoding.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

DECODE_MAX_TOKENS = 64  # at or below (decode, small prefill), inference uses the decode kernels


def kernels_interpreted() -> bool:
    """Run the Triton kernels on CPU tensors: only when asked (MOELORA_CPU_KERNELS=1, used by
    tests) and the kernels were imported under TRITON_INTERPRET=1. The interpreter is far too slow
    to be a default: on CPU the layers otherwise take their torch paths."""
    if os.environ.get("MOELORA_CPU_KERNELS") != "1":
        return False
    from moelora_kernels import mixlora_ffn

    return mixlora_ffn._INTERPRET


def decode_kernels_apply(x: torch.Tensor, module: nn.Module) -> bool:
    """x: the (tokens, features) input of the layer."""
    return ((x.is_cuda or kernels_interpreted()) and not torch.is_grad_enabled() and not module.training
            and x.shape[0] <= DECODE_MAX_TOKENS)
