"""Plain LoRA: ``y = W x + s * B (A dropout(x))`` around a frozen ``nn.Linear`` (never copied)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import decode_graphs
from .dispatch import decode_kernels_apply


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


class LoraLinear(nn.Module):
    """A frozen linear plus one LoRA delta. ``merge()``/``unmerge()`` fold the delta into the
    base weight for adapter-free inference; unmerge restores the exact original weight."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: str = "kaiming",
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        w = base_layer.weight
        dtype = resolve_dtype(adapter_dtype, w)
        out_f, in_f = w.shape
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=w.device))  # (R, in)
        self.lora_B = nn.Parameter(torch.empty(out_f, r, dtype=dtype, device=w.device))  # (out, R)
        init_lora_(self.lora_A, self.lora_B, init_lora_weights, r)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None
        self._context = None  # the model's RoutingContext, set by inject_adapter (tells decode steps)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., R)
        return F.linear(h, self.lora_B) * self.scaling  # (..., out)

    def _decode(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode math for x2 (T, in): frozen GEMM + delta through moelora_kernels.ops."""
        from moelora_kernels import ops

        base = self.base_layer
        return ops.linear_with_lora(x2, base.weight, base.bias, self.lora_A, self.lora_B, None, None, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        lora_A, lora_B = self.lora_A, self.lora_B
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        if not self.merged and lora_A.dtype == x.dtype and decode_kernels_apply(x2, self):
            if torch.compiler.is_compiling():
                # Compiled decode: the delta runs beside the frozen GEMM (moelora_kernels.ops).
                y = self._decode(x2)
                return y.view(*x.shape[:-1], y.shape[-1])
            if decode_graphs.applies(x2, self._context):
                # Eager decode step: GEMM + delta replayed as one CUDA graph (decode_graphs).
                y = decode_graphs.graphed(self, self._decode, (x2,), (base.weight, base.bias, lora_A, lora_B,
                                                                      self.scaling))
                return y.view(*x.shape[:-1], y.shape[-1])
            # Otherwise eager keeps the two torch ops below: a Triton launch costs more host time (~55 µs).
        # F.linear directly, not base(x): eager decode is launch-bound and a module call costs ~10 µs.
        y = F.linear(x, base.weight, base.bias)
        if self.merged:
            return y
        if lora_A.dtype != y.dtype:
            return y + self.lora_delta(x).to(y.dtype)
        if self.training:
            x = self.lora_dropout(x)
        # Same math in 2 launches instead of 4: h = A x; y += s * B h, in place (out-of-place
        # addmm would first copy y: one more launch per linear, and eager decode is launch-bound).
        h = F.linear(x, lora_A)  # (..., R)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, self.r), lora_B.t(), alpha=self.scaling)
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s*B@A into the base weight (fp32 add, one rounding). Merging twice is a no-op."""
        if self.merged:
            return
        w = self.base_layer.weight
        # Keep the original so unmerge is exact: W - dW after rounding would not give W back in bf16.
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by ``merge``."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
