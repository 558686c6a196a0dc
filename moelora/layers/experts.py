"""Stacked LoRA experts of one projection, shared by MixLoRA (FFN experts) and LoRA-Switch."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import gathered_kernel_applies
from .lora_math import init_lora_, resolve_dtype


def _gathered_lora(x, lora_A, lora_B, idx, weight=None, scaling=1.0):
    """Dispatch to the Triton kernel on CUDA and to its torch reference elsewhere."""
    from moelora_kernels import gathered_lora as gl

    fn = gl.gathered_lora if gathered_kernel_applies(x) else gl.gathered_lora_reference
    return fn(x, lora_A, lora_B, idx, weight=weight, scaling=scaling)


class LoraExperts(nn.Module):
    """E LoRA deltas of one projection, stacked: lora_A (E, R, in), lora_B (E, out, R)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float,
        init: str,
        adapter_dtype: str,
    ) -> None:
        super().__init__()
        w = base_layer.weight
        dtype = resolve_dtype(adapter_dtype, w)
        out_f, in_f = w.shape
        self.num_experts, self.r, self.scaling = num_experts, r, scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_f, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_f, r, dtype=dtype, device=w.device))
        init_lora_(self.lora_A, self.lora_B, init, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """s * B_e A_e dropout(x) for the tokens x (n, in) routed to expert e (eager path)."""
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A[e])  # (n, R)
        return F.linear(h, self.lora_B[e]) * self.scaling  # (n, out)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Deltas of the selected experts: x (N, in) or (N, K, in) -> (N, K, out), or (N, out)
        summed with ``weight`` (N, K)."""
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        w = None if weight is None else weight.to(self.lora_A.dtype)
        return _gathered_lora(x, self.lora_A, self.lora_B, idx, weight=w, scaling=self.scaling)
